use std::process::ExitCode;

use tapir::doctor;

pub fn run() -> anyhow::Result<ExitCode> {
    let checks = doctor::check_host();
    print!("{}", doctor::render(&checks));
    Ok(if doctor::core_ok(&checks) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

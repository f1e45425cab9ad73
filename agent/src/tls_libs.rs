//! Where OpenSSL lives on this host, for the TLS uprobes (`agent-ebpf/src/tls.rs`): every
//! `libssl.so*` that a running process maps, every running executable that carries OpenSSL
//! itself and exports it (the official Node.js builds), plus the usual paths of both (a
//! process started later loads or runs one of those). Each file is probed once, however
//! many paths lead to it.
use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use object::{read::ReadCache, Object, ObjectSection, ObjectSymbol, ReadRef};

/// Where distributions install libssl (Debian/Ubuntu, Fedora/RHEL, Alpine, Arch).
const USUAL_PATHS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/libssl.so.3",
    "/usr/lib/x86_64-linux-gnu/libssl.so.1.1",
    "/usr/lib/aarch64-linux-gnu/libssl.so.3",
    "/usr/lib64/libssl.so.3",
    "/usr/lib64/libssl.so.1.1",
    "/usr/lib/libssl.so.3",
    "/lib/libssl.so.3",
];

/// Where programs that carry their own OpenSSL are installed (Node.js from nodejs.org or
/// NodeSource), probed when they export it.
const USUAL_EXES: &[&str] = &["/usr/bin/node", "/usr/local/bin/node"];

/// The programs: the entry of a read or write (three forms: where the call's byte count
/// is), and the returns.
pub const SSL_ENTER_PROGRAM: &str = "tapir_ssl_enter";
pub const SSL_ENTER_OUT5_PROGRAM: &str = "tapir_ssl_enter_out5";
pub const SSL_ENTER_RET_PROGRAM: &str = "tapir_ssl_enter_ret";
pub const SSL_READ_EXIT_PROGRAM: &str = "tapir_ssl_read_exit";
pub const SSL_WRITE_EXIT_PROGRAM: &str = "tapir_ssl_write_exit";

/// Where a probed function gives the number of bytes it moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslCount {
    /// Through its fourth argument, `size_t *done`, returning 1 (`ssl_read_internal`,
    /// `ssl_write_internal` before OpenSSL 3.2).
    DoneFourth,
    /// Through its fifth (`ssl_write_internal` from OpenSSL 3.2, after `flags`).
    DoneFifth,
    /// As its return value, when positive (`SSL_read`, `SSL_write`).
    Returned,
}

impl SslCount {
    /// The entry program for functions of this form.
    pub fn entry_program(self) -> &'static str {
        match self {
            SslCount::DoneFourth => SSL_ENTER_PROGRAM,
            SslCount::DoneFifth => SSL_ENTER_OUT5_PROGRAM,
            SslCount::Returned => SSL_ENTER_RET_PROGRAM,
        }
    }
}

/// Where in a libssl (or a program carrying OpenSSL) the TLS probes go: OpenSSL's internal
/// read and write (`ssl_read_internal`, `ssl_write_internal`), which `SSL_read`/`SSL_read_ex`
/// and `SSL_write`/`SSL_write_ex` all call, found from the public functions' code; where a
/// build inlined them (Node.js), `SSL_read` and `SSL_write` themselves.
///
/// Why not the public functions first: a uprobe on an instruction the kernel cannot
/// emulate (Debian's `SSL_read` starts with `sub $n,%rsp`) single-steps it, and on a VM
/// each single step is a trap to the hypervisor: ~16 µs per probe hit here (5 SSL calls
/// per HTTPS request made nginx 5× slower). The internal functions start with `push`es,
/// which the kernel emulates: ~0.4 µs. They also take one signature for both forms:
/// `(SSL *, buf, num, size_t *done)` returning 1 with `*done` set (from OpenSSL 3.2 the
/// write takes `flags` before `done`). Public functions are probed only when they too
/// start with an instruction the kernel emulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SslProbePoints {
    /// File offsets (what the kernel attaches uprobes by).
    pub read: u64,
    pub write: u64,
    pub read_count: SslCount,
    pub write_count: SslCount,
    /// The probed functions start with an instruction the kernel emulates.
    pub cheap: bool,
}

/// Bytes of a public function looked at for its call of the internal one.
const PROLOGUE_BYTES: usize = 64;

/// Why a file gets no probes.
#[derive(Debug, thiserror::Error)]
pub enum ProbePointsError {
    /// It does not define OpenSSL's `SSL_read` and `SSL_write` (or cannot be read).
    #[error("{0}")]
    NotOpenSsl(String),
    /// It does, but its code is not what Tapir can probe cheaply and safely.
    #[error("{0}")]
    Unrecognised(String),
}

/// Finds the probe points of the libssl or program at `path`.
pub fn probe_points(path: &Path) -> Result<SslProbePoints, ProbePointsError> {
    use ProbePointsError::*;
    let file = std::fs::File::open(path)
        .map_err(|e| NotOpenSsl(format!("opening {}: {e}", path.display())))?;
    // Read on demand: a program carrying OpenSSL can be 100 MB, of which a few pages are
    // looked at.
    let data = ReadCache::new(file);
    let elf =
        object::File::parse(&data).map_err(|e| NotOpenSsl(format!("{}: {e}", path.display())))?;
    let found = openssl_symbols(&elf);
    let missing = |i: usize| format!("{} has no {}", path.display(), OPENSSL_SYMBOLS[i]);
    let [read, write, read_ex, write_ex, write_ex2] = found;
    let read = read.ok_or_else(|| NotOpenSsl(missing(0)))?;
    let write = write.ok_or_else(|| NotOpenSsl(missing(1)))?;
    // OpenSSL before 1.1.1.
    let read_ex = read_ex.ok_or_else(|| Unrecognised(missing(2)))?;
    let write_ex = write_ex.ok_or_else(|| Unrecognised(missing(3)))?;
    if elf.architecture() != object::Architecture::X86_64 {
        return Err(Unrecognised(format!("{}: not x86_64 code", path.display())));
    }
    // (file offset, bytes) of the code at `va`.
    let code_at = |va: u64, len: usize| -> Option<(u64, &[u8])> {
        let section = elf.sections().find(|s| {
            s.kind() == object::SectionKind::Text
                && (s.address()..s.address() + s.size()).contains(&va)
        })?;
        let (file_start, _) = section.file_range()?;
        let offset = file_start + (va - section.address());
        let left = section.address() + section.size() - va;
        let bytes = data.read_bytes_at(offset, (len as u64).min(left)).ok()?;
        Some((offset, bytes))
    };
    // The internal function that both forms call first.
    let internal =
        |ex_va: u64, ex: &str, plain_va: u64, plain: &str| -> Result<(u64, bool), String> {
            let (_, ex_code) = code_at(ex_va, PROLOGUE_BYTES)
                .ok_or_else(|| format!("{ex} is outside the code"))?;
            let target = prologue_call(ex_code, ex_va)
                .ok_or_else(|| format!("{ex} does not start with a call"))?;
            let (_, plain_code) = code_at(plain_va, PROLOGUE_BYTES)
                .ok_or_else(|| format!("{plain} is outside the code"))?;
            if !calls(plain_code, plain_va, target) {
                return Err(format!(
                    "{plain} and {ex} do not call the same function first"
                ));
            }
            let (offset, first) =
                code_at(target, 2).ok_or_else(|| format!("{ex}'s callee is outside the code"))?;
            Ok((offset, emulated_first_instruction(first)))
        };
    let inner = internal(read_ex, "SSL_read_ex", read, "SSL_read")
        .and_then(|r| Ok((r, internal(write_ex, "SSL_write_ex", write, "SSL_write")?)));
    match inner {
        Ok(((read, read_cheap), (write, write_cheap))) => Ok(SslProbePoints {
            read,
            write,
            read_count: SslCount::DoneFourth,
            write_count: if write_ex2.is_some() {
                SslCount::DoneFifth
            } else {
                SslCount::DoneFourth
            },
            cheap: read_cheap && write_cheap,
        }),
        Err(why) => {
            // Inlined: the public functions, if the kernel emulates their first instruction.
            let public =
                |va: u64| code_at(va, 2).filter(|(_, first)| emulated_first_instruction(first));
            match (public(read), public(write)) {
                (Some((read, _)), Some((write, _))) => Ok(SslProbePoints {
                    read,
                    write,
                    read_count: SslCount::Returned,
                    write_count: SslCount::Returned,
                    cheap: true,
                }),
                _ => Err(Unrecognised(format!(
                    "{}: {why}, and SSL_read/SSL_write start with an instruction the kernel \
                     single-steps (several µs per call; on a VM ~16)",
                    path.display()
                ))),
            }
        }
    }
}

/// The target of the call (or tail jump) that ends a function's prologue, if the prologue
/// is made of instructions that leave the argument registers alone: `endbr64`, pushes,
/// `sub $n,%rsp`, `mov %rsp,%rbp`. `va` is the code's virtual address.
fn prologue_call(code: &[u8], va: u64) -> Option<u64> {
    let mut at = 0;
    while at < code.len() {
        let len = match &code[at..] {
            [0xf3, 0x0f, 0x1e, 0xfa, ..] => 4,       // endbr64
            [0x48, 0x83, 0xec, _, ..] => 4,          // sub $imm8,%rsp
            [0x48, 0x81, 0xec, _, _, _, _, ..] => 7, // sub $imm32,%rsp
            [0x50..=0x57, ..] => 1,                  // push %rax…%rdi
            [0x41, 0x50..=0x57, ..] => 2,            // push %r8…%r15
            [0x48, 0x89, 0xe5, ..] => 3,             // mov %rsp,%rbp
            [0xe8 | 0xe9, ..] => return rel32_target(code, at, va),
            _ => return None,
        };
        at += len;
    }
    None
}

/// Where the `call rel32`/`jmp rel32` at `code[at]` goes.
fn rel32_target(code: &[u8], at: usize, va: u64) -> Option<u64> {
    let rel: [u8; 4] = code.get(at + 1..at + 5)?.try_into().ok()?;
    let next = va.checked_add(at as u64 + 5)?;
    next.checked_add_signed(i64::from(i32::from_le_bytes(rel)))
}

/// Whether `code` (at `va`) has a `call rel32` to `target`.
fn calls(code: &[u8], va: u64, target: u64) -> bool {
    (0..code.len()).any(|at| code[at] == 0xe8 && rel32_target(code, at, va) == Some(target))
}

/// Whether a function starting with `code` can be probed without single-stepping: x86
/// kernels emulate a probed `push` (and branches, nops); anything else is stepped.
fn emulated_first_instruction(code: &[u8]) -> bool {
    matches!(code, [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..])
}

/// (device, inode) of a file: one probe per file, whatever the path.
pub fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether a mapped file's name is OpenSSL's libssl (`libssl.so`, `libssl.so.3`, …).
pub fn is_libssl(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name == "libssl.so" || name.starts_with("libssl.so.")
}

/// A file that carries OpenSSL, and where its probes go (or why they cannot).
#[derive(Debug)]
pub struct Found {
    pub path: PathBuf,
    pub points: Result<SslProbePoints, ProbePointsError>,
}

/// The files to probe on this host that are not in `checked` (which then holds them and
/// every other file looked at): the libssl files mapped by running processes (as
/// `/proc/PID/root` sees them, so containers' own copies are found too) and at the usual
/// paths, and the programs that export OpenSSL's read and write (running ones, and those at
/// the usual paths), one path per file. Each is read once, for its probe points (a program
/// carrying OpenSSL is ~100 MB, of which a few pages are read).
pub fn find(checked: &mut HashSet<(u64, u64)>) -> Vec<Found> {
    let mut found = Vec::new();
    let mut add = |path: PathBuf, exe: bool| {
        let Some(id) = file_id(&path).filter(|_| path.is_file()) else {
            return;
        };
        if !checked.insert(id) {
            return;
        }
        let points = probe_points(&path);
        // A program is a candidate only if it exports OpenSSL; a libssl always is.
        if !(exe && matches!(points, Err(ProbePointsError::NotOpenSsl(_)))) {
            found.push(Found { path, points });
        }
    };
    for p in USUAL_PATHS {
        add(PathBuf::from(p), false);
    }
    for p in USUAL_EXES {
        add(PathBuf::from(p), true);
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
            add(root.join(exe.strip_prefix("/").unwrap_or(&exe)), true);
        }
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue;
        };
        for lib in mapped_libssl(&maps) {
            add(root.join(lib.trim_start_matches('/')), false);
        }
    }
    found
}

/// The OpenSSL functions whose addresses [`openssl_symbols`] looks up.
const OPENSSL_SYMBOLS: [&str; 5] = [
    "SSL_read",
    "SSL_write",
    "SSL_read_ex",
    "SSL_write_ex",
    "SSL_write_ex2",
];

/// The addresses of [`OPENSSL_SYMBOLS`] that `elf` defines, in one pass over its dynamic
/// symbols (tens of thousands in `node`).
fn openssl_symbols<'a, R: ReadRef<'a>>(elf: &object::File<'a, R>) -> [Option<u64>; 5] {
    let mut found = [None; 5];
    for s in elf.dynamic_symbols().filter(|s| s.is_definition()) {
        if let Some(i) = s
            .name()
            .ok()
            .and_then(|n| OPENSSL_SYMBOLS.iter().position(|w| *w == n))
        {
            found[i] = Some(s.address());
        }
    }
    found
}

/// The distinct libssl paths in a `/proc/PID/maps` text.
fn mapped_libssl(maps: &str) -> Vec<&str> {
    let mut libs: Vec<&str> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        if path.starts_with('/') && is_libssl(path) && !libs.contains(&path) {
            libs.push(path);
        }
    }
    libs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Debian 12's libssl.so.3 (OpenSSL 3.0.x): SSL_read_ex and SSL_read.
    const READ_EX: &[u8] = &[
        0x48, 0x83, 0xec, 0x08, // sub $0x8,%rsp
        0xe8, 0xc7, 0xfd, 0xff, 0xff, // call 35290
        0x31, 0xd2, // xor %edx,%edx
    ];
    const READ: &[u8] = &[
        0x48, 0x83, 0xec, 0x18, 0x64, 0x48, 0x8b, 0x04, 0x25, 0x28, 0x00, 0x00, 0x00, 0x48, 0x89,
        0x44, 0x24, 0x08, 0x31, 0xc0, 0x85, 0xd2, 0x78, 0x2f, 0x48, 0x89, 0xe1, 0x48, 0x63, 0xd2,
        0xe8, 0x3d, 0xfe, 0xff, 0xff, // call 35290
        0x85, 0xc0,
    ];

    #[test]
    fn the_internal_read_is_what_both_public_reads_call() {
        assert_eq!(prologue_call(READ_EX, 0x354c0), Some(0x35290));
        assert!(calls(READ, 0x35430, 0x35290));
        assert!(!calls(READ, 0x35430, 0x35291));
        // SSL_read does not start with its call: not a prologue Tapir takes.
        assert_eq!(prologue_call(READ, 0x35430), None);
        // endbr64, push %rbp, mov %rsp,%rbp, then a tail jump.
        let cet = [
            0xf3, 0x0f, 0x1e, 0xfa, 0x55, 0x48, 0x89, 0xe5, 0xe9, 0x00, 0x01, 0x00, 0x00,
        ];
        assert_eq!(prologue_call(&cet, 0x1000), Some(0x1000 + 13 + 0x100));
        // A backwards call.
        assert_eq!(
            prologue_call(&[0xe8, 0xfb, 0xff, 0xff, 0xff], 0x2000),
            Some(0x2000)
        );
    }

    #[test]
    fn odd_code_is_refused_not_misread() {
        assert_eq!(prologue_call(&[], 0), None);
        assert_eq!(prologue_call(&[0x48, 0x83], 0), None); // cut short
        assert_eq!(prologue_call(&[0xe8, 0x01, 0x02], 0), None); // call cut short
        assert_eq!(
            prologue_call(&[0x48, 0x89, 0xf8, 0xe8, 0, 0, 0, 0], 0),
            None
        ); // mov %rdi,%rax first
        assert_eq!(prologue_call(&[0xe8, 0, 0, 0, 0x80], u64::MAX - 2), None); // wraps
        for seed in 0u64..2000 {
            // Random bytes never panic.
            let bytes: Vec<u8> = (0..40)
                .map(|i| {
                    (seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(i * 1442695040888963407)
                        >> 33) as u8
                })
                .collect();
            let _ = prologue_call(&bytes, seed << 12);
            let _ = calls(&bytes, seed << 12, 0x1234);
        }
        assert!(emulated_first_instruction(&[0x41, 0x55]));
        assert!(emulated_first_instruction(&[0x55]));
        assert!(!emulated_first_instruction(&[0x48, 0x83, 0xec, 0x18]));
        assert!(!emulated_first_instruction(&[0xf3, 0x0f, 0x1e, 0xfa]));
    }

    #[test]
    fn this_hosts_libssl_has_probe_points() {
        let found = find(&mut HashSet::new());
        assert!(!found.is_empty(), "no libssl found");
        for Found { path, points } in found {
            let p = points.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(probe_points(&path).ok(), Some(p), "{path:?}");
            assert!(p.cheap, "{p:?}");
            assert!(p.read != p.write && p.read > 0 && p.write > 0, "{p:?}");
            let internal = p.read_count != SslCount::Returned;
            assert_eq!(
                internal,
                is_libssl(&path.to_string_lossy()),
                "{path:?}: {p:?}"
            );
        }
    }

    #[test]
    fn a_program_carrying_openssl_is_found_and_others_are_not() {
        // This machine's Node.js (NodeSource's build) carries OpenSSL and exports it.
        let node = Path::new("/usr/bin/node");
        if node.exists() {
            let id = file_id(node);
            assert!(find(&mut HashSet::new())
                .iter()
                .any(|f| file_id(&f.path) == id && f.points.is_ok()));
        }
        // This test binary runs, and does not carry OpenSSL.
        let own = std::env::current_exe().expect("the test binary's path");
        let own_id = file_id(&own);
        assert!(!find(&mut HashSet::new())
            .iter()
            .any(|f| file_id(&f.path) == own_id));
        assert!(matches!(
            probe_points(&own),
            Err(ProbePointsError::NotOpenSsl(_))
        ));
        assert!(matches!(
            probe_points(Path::new("/nonexistent")),
            Err(ProbePointsError::NotOpenSsl(_))
        ));
    }

    #[test]
    fn libssl_names() {
        assert!(is_libssl("/usr/lib/x86_64-linux-gnu/libssl.so.3"));
        assert!(is_libssl("/opt/app/lib/libssl.so.1.1"));
        assert!(is_libssl("libssl.so"));
        assert!(!is_libssl("/usr/lib/x86_64-linux-gnu/libssl3.so")); // NSS, not OpenSSL
        assert!(!is_libssl("/usr/lib/libcrypto.so.3"));
        assert!(!is_libssl("/usr/lib/libssl.so.3.bak/x"));
    }

    #[test]
    fn libssl_paths_from_a_maps_file() {
        let maps = "\
7f00-7f01 r--p 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f01-7f02 r-xp 00001000 08:01 123 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f02-7f03 r--p 00000000 08:01 124 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f03-7f04 rw-p 00000000 00:00 0
7f04-7f05 r--p 00000000 08:01 125 /app/lib/libssl.so.1.1 (deleted)
garbage
";
        assert_eq!(
            mapped_libssl(maps),
            [
                "/usr/lib/x86_64-linux-gnu/libssl.so.3",
                "/app/lib/libssl.so.1.1"
            ]
        );
    }

    #[test]
    fn finds_this_hosts_libssl_once() {
        let mut checked = HashSet::new();
        let found = find(&mut checked);
        assert!(find(&mut checked).is_empty(), "found again");
        let mut ids: Vec<_> = found
            .iter()
            .filter_map(|f| std::fs::metadata(&f.path).ok())
            .map(|m| (m.dev(), m.ino()))
            .collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "{found:?}");
    }
}

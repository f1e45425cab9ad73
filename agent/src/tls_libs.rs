//! Where OpenSSL's libssl lives on this host, for the TLS uprobes (`agent-ebpf/src/tls.rs`):
//! every `libssl.so*` that a running process maps, plus the distributions' usual paths (a
//! process started later loads one of those). Each file is probed once, however many
//! paths lead to it.
use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

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

/// The SSL functions probed, each with the program that reads its return. Their entries
/// share one program (`tapir_ssl_enter`).
pub const SSL_FUNCTIONS: [(&str, &str); 4] = [
    ("SSL_read", "tapir_ssl_read_exit"),
    ("SSL_read_ex", "tapir_ssl_read_ex_exit"),
    ("SSL_write", "tapir_ssl_write_exit"),
    ("SSL_write_ex", "tapir_ssl_write_ex_exit"),
];
pub const SSL_ENTER_PROGRAM: &str = "tapir_ssl_enter";

/// Whether a mapped file's name is OpenSSL's libssl (`libssl.so`, `libssl.so.3`, …).
pub fn is_libssl(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name == "libssl.so" || name.starts_with("libssl.so.")
}

/// The libssl files of this host: those mapped by running processes (as `/proc/PID/root`
/// sees them, so containers' own copies are found too) and those at the usual paths,
/// one path per file.
pub fn find() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    let mut add = |path: PathBuf| {
        if let Ok(meta) = std::fs::metadata(&path) {
            if meta.is_file() && seen.insert((meta.dev(), meta.ino())) {
                found.push(path);
            }
        }
    };
    for p in USUAL_PATHS {
        add(PathBuf::from(p));
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
        let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
            continue;
        };
        for lib in mapped_libssl(&maps) {
            add(Path::new(&format!("/proc/{pid}/root")).join(lib.trim_start_matches('/')));
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
        let found = find();
        let mut ids: Vec<_> = found
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| (m.dev(), m.ino()))
            .collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "{found:?}");
    }
}

//! `--open-port`: which processes listen on the given TCP ports. Processes that start
//! listening later are caught by the kernel at listen() (`tapir_exit_listen`); this module
//! finds those already listening when Tapir starts, from /proc.
use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

/// `--open-port` values as given: ports and ranges (`8080`, `8000-8099`), each value
/// possibly a comma-separated list. Returns the ports sorted, without repeats.
pub fn parse_open_ports(specs: &[String]) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for item in specs.iter().flat_map(|s| s.split(',')) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let port = |s: &str| -> Result<u16, String> {
            match s.trim().parse::<u16>() {
                Ok(p) if p > 0 => Ok(p),
                _ => Err(format!(
                    "--open-port {item:?}: give TCP ports from 1 to 65535, or ranges such as \
                     8000-8099"
                )),
            }
        };
        match item.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    return Err(format!(
                        "--open-port {item:?}: a range goes from the lower port to the higher"
                    ));
                }
                ports.extend(lo..=hi);
            }
            None => ports.push(port(item)?),
        }
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// `ports` (sorted) as runs: `80, 8000-8099`.
pub fn describe_ports(ports: &[u16]) -> String {
    let mut runs: Vec<(u16, u16)> = Vec::new();
    for &p in ports {
        match runs.last_mut() {
            Some((_, hi)) if hi.checked_add(1) == Some(p) => *hi = p,
            _ => runs.push((p, p)),
        }
    }
    runs.iter()
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The inodes of the listening sockets on `ports` (sorted) in one `/proc/…/net/tcp` or
/// `tcp6` table. Lines that do not parse are skipped.
pub fn listen_inodes(table: &str, ports: &[u16]) -> Vec<u64> {
    const LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, state, inode) = (f.get(1)?, f.get(3)?, f.get(9)?);
            if *state != LISTEN {
                return None;
            }
            let port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            let inode: u64 = inode.parse().ok()?;
            (inode != 0 && ports.binary_search(&port).is_ok()).then_some(inode)
        })
        .collect()
}

/// The socket inode an fd link points at (`socket:[12345]`).
fn socket_inode(link: &Path) -> Option<u64> {
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Pids under `proc_root` (normally `/proc`) that hold a listening TCP socket on one of
/// `ports` (sorted): each network namespace's tables are read once, through one of its
/// processes, then every process's fds are matched against them. Processes that vanish or
/// cannot be read are skipped.
pub fn listening_pids(proc_root: &Path, ports: &[u16]) -> HashSet<u32> {
    let pids: Vec<u32> = match std::fs::read_dir(proc_root) {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return HashSet::new(),
    };
    let mut namespaces: HashMap<std::path::PathBuf, Vec<u32>> = HashMap::new();
    for &pid in &pids {
        if let Ok(ns) = std::fs::read_link(proc_root.join(format!("{pid}/ns/net"))) {
            namespaces.entry(ns).or_default().push(pid);
        }
    }
    let mut inodes = HashSet::new();
    for members in namespaces.values() {
        // Through the first member still there to read it (processes come and go).
        let tables = members.iter().find_map(|pid| {
            let read = |t: &str| std::fs::read_to_string(proc_root.join(format!("{pid}/net/{t}")));
            Some((read("tcp").ok()?, read("tcp6").unwrap_or_default()))
        });
        if let Some((tcp, tcp6)) = tables {
            inodes.extend(listen_inodes(&tcp, ports));
            inodes.extend(listen_inodes(&tcp6, ports));
        }
    }
    if inodes.is_empty() {
        return HashSet::new();
    }
    pids.into_iter()
        .filter(|pid| {
            let Ok(fds) = std::fs::read_dir(proc_root.join(format!("{pid}/fd"))) else {
                return false;
            };
            fds.filter_map(Result::ok).any(|fd| {
                std::fs::read_link(fd.path())
                    .ok()
                    .and_then(|l| socket_inode(&l))
                    .is_some_and(|i| inodes.contains(&i))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn ports_ranges_and_lists() {
        assert_eq!(
            parse_open_ports(&specs(&["8080", "80,443", " 9000-9002 ", "443"])),
            Ok(vec![80, 443, 8080, 9000, 9001, 9002])
        );
        assert_eq!(
            parse_open_ports(&specs(&["1-65535"])).map(|p| p.len()),
            Ok(65535)
        );
        assert_eq!(parse_open_ports(&specs(&[])), Ok(vec![]));
        assert_eq!(parse_open_ports(&specs(&[","])), Ok(vec![]));
        for bad in [
            "0", "65536", "http", "-80", "80-", "90-80", "8080-x", "1--2",
        ] {
            let err = parse_open_ports(&specs(&[bad])).unwrap_err();
            assert!(err.contains("--open-port"), "{bad}: {err}");
        }
    }

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1002 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2001 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn ports_described_as_runs() {
        let p = parse_open_ports(&specs(&["8000-8002,80,9000,65535,65534"])).unwrap();
        assert_eq!(describe_ports(&p), "80, 8000-8002, 9000, 65534-65535");
        assert_eq!(describe_ports(&[]), "");
    }

    #[test]
    fn listening_sockets_on_the_ports_only() {
        // 0x1F90 = 8080 (listening: 1001; an established connection on it: not), 0x50 = 80.
        assert_eq!(listen_inodes(TCP, &[8080]), [1001]);
        assert_eq!(listen_inodes(TCP, &[80, 8080]), [1001, 1002]);
        // A listener with no inode (0) is not a process's.
        assert!(listen_inodes(TCP, &[8081]).is_empty());
        assert_eq!(listen_inodes(TCP6, &[8080]), [2001]);
        assert!(listen_inodes(TCP, &[443]).is_empty());
    }

    #[test]
    fn malformed_tables_are_skipped_not_fatal() {
        // A cut table yields at most as many listeners as the whole one (a cut inode may
        // read as a shorter number), never a panic.
        for n in 0..TCP.len() {
            assert!(
                listen_inodes(&TCP[..n], &[80, 8080]).len() <= 2,
                "cut at {n}"
            );
        }
        for junk in [
            "",
            "\n\n",
            "x\n1: zz:zz 0A a b c d e f",
            "h\n0: :1F90 x 0A a b c d e 7",
        ] {
            let _ = listen_inodes(junk, &[8080]);
        }
        assert_eq!(listen_inodes("h\n0: A:1F90 x 0A a b c d e 7", &[8080]), [7]);
    }

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode(Path::new("socket:[123]")), Some(123));
        assert_eq!(socket_inode(Path::new("pipe:[123]")), None);
        assert_eq!(socket_inode(Path::new("socket:[x]")), None);
        assert_eq!(socket_inode(Path::new("/dev/null")), None);
    }

    #[test]
    fn this_process_listening_is_found() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let found = listening_pids(Path::new("/proc"), &[port]);
        assert!(found.contains(&std::process::id()), "{found:?}");
        drop(l);
        assert!(!listening_pids(Path::new("/proc"), &[port]).contains(&std::process::id()));
    }
}

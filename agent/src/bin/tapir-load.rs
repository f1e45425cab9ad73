//! `tapir-load`: a fixed-rate HTTP/1.1 keep-alive load generator for `cargo xtask bench`.
//!
//! wrk sends the next request as soon as a response arrives, so it always runs the server
//! flat out: any CPU the agent takes lowers throughput, and in that closed loop every
//! request waits longer (latency ≈ connections / throughput). Services rarely run that way.
//! This tool sends at a fixed rate instead (an open loop, like wrk2): request `k` is due
//! at `k / rate` seconds, on connection `k mod conns`, and its latency counts from when it
//! was due, not from when it could be sent, so a stall delays every request queued behind
//! it (no "coordinated omission").
//!
//! ```text
//! tapir-load --port PORT [--conns 16] [--rate 20000] [--secs 5]
//! ```
//!
//! One thread (pin it with taskset); prints one JSON line of counts and percentiles.
use std::{
    collections::VecDeque,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Fixed-rate HTTP/1.1 keep-alive load for `cargo xtask bench`")]
struct Cli {
    /// Server port on 127.0.0.1.
    #[arg(long)]
    port: u16,
    /// Keep-alive connections; requests go round-robin over them, one in flight each.
    #[arg(long, default_value_t = 16)]
    conns: usize,
    /// Requests per second, whatever the server's pace.
    #[arg(long, default_value_t = 20_000)]
    rate: u32,
    /// Seconds of load (in-flight requests then get up to 2 s more to finish).
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Request path.
    #[arg(long, default_value = "/")]
    path: String,
}

/// A response never grows past this before its head is complete.
const MAX_HEAD: usize = 16 << 10;

struct Conn {
    stream: TcpStream,
    /// Due times of requests assigned to this connection and not sent yet.
    backlog: VecDeque<Instant>,
    /// Due time of the request in flight.
    in_flight: Option<Instant>,
    buf: Vec<u8>,
    /// The server closed it: its requests count as errors.
    closed: bool,
}

#[derive(Default)]
struct Tally {
    latencies_ns: Vec<u64>,
    errors: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.conns == 0 || cli.rate == 0 {
        bail!("--conns and --rate must be positive");
    }
    // Timers fire within 50 µs by default; the schedule needs better than that.
    // SAFETY: prctl with an integer argument.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1u64) };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUser-Agent: tapir-load\r\n\r\n",
        cli.path, cli.port
    );
    let mut conns = (0..cli.conns)
        .map(|_| {
            let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, cli.port))
                .with_context(|| format!("connecting to 127.0.0.1:{}", cli.port))?;
            stream.set_nodelay(true)?;
            stream.set_nonblocking(true)?;
            Ok(Conn {
                stream,
                backlog: VecDeque::new(),
                in_flight: None,
                buf: Vec::with_capacity(4096),
                closed: false,
            })
        })
        .collect::<Result<Vec<_>>>()?;

    let period = Duration::from_secs_f64(1.0 / f64::from(cli.rate));
    let planned = cli.secs * u64::from(cli.rate);
    let mut tally = Tally {
        latencies_ns: Vec::with_capacity(planned as usize),
        ..Tally::default()
    };
    let start = Instant::now();
    let load_end = start + Duration::from_secs(cli.secs);
    let drain_end = load_end + Duration::from_secs(2);
    let mut next_k: u64 = 0;
    let mut fds: Vec<libc::pollfd> = conns
        .iter()
        .map(|c| libc::pollfd {
            fd: c.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        let now = Instant::now();
        // Requests that came due, round-robin.
        while next_k < planned {
            let due = start + period.mul_f64(next_k as f64);
            if due > now {
                break;
            }
            conns[(next_k % cli.conns as u64) as usize]
                .backlog
                .push_back(due);
            next_k += 1;
        }
        for c in &mut conns {
            if c.in_flight.is_none() {
                if let Some(due) = c.backlog.pop_front() {
                    send(c, request.as_bytes(), due, &mut tally);
                }
            }
        }
        let busy = conns
            .iter()
            .any(|c| c.in_flight.is_some() || !c.backlog.is_empty());
        if (next_k >= planned && !busy) || now >= drain_end {
            break;
        }
        let wake = if next_k < planned {
            (start + period.mul_f64(next_k as f64)).min(load_end)
        } else {
            drain_end
        };
        let wait = wake.saturating_duration_since(Instant::now());
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `fds` is a valid pollfd array for the duration of the call.
        let n = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        if n <= 0 {
            continue;
        }
        for (c, fd) in conns.iter_mut().zip(&mut fds) {
            if fd.revents != 0 {
                fd.revents = 0;
                receive(c, &mut tally);
                if c.closed {
                    fd.fd = -1; // poll skips it from now on
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let unsent: u64 = conns.iter().map(|c| c.backlog.len() as u64).sum();
    let unanswered = conns.iter().filter(|c| c.in_flight.is_some()).count() as u64;
    let mut l = tally.latencies_ns;
    l.sort_unstable();
    let pct = |p: f64| -> f64 {
        if l.is_empty() {
            return 0.0;
        }
        let i = ((p / 100.0) * l.len() as f64).ceil() as usize;
        l[i.clamp(1, l.len()) - 1] as f64 / 1e3
    };
    let out = serde_json::json!({
        "rate": cli.rate,
        "conns": cli.conns,
        "secs": cli.secs,
        "planned": planned,
        "completed": l.len(),
        "unsent": unsent,
        "unanswered": unanswered,
        "errors": tally.errors,
        "achieved_rps": l.len() as f64 / elapsed.min(cli.secs as f64 + 2.0),
        "p50_us": pct(50.0),
        "p90_us": pct(90.0),
        "p99_us": pct(99.0),
        "p999_us": pct(99.9),
        "max_us": l.last().map_or(0.0, |&v| v as f64 / 1e3),
    });
    println!("{out}");
    Ok(())
}

fn send(c: &mut Conn, request: &[u8], due: Instant, tally: &mut Tally) {
    if c.closed {
        tally.errors += 1;
        return;
    }
    // A small request on an idle keep-alive socket goes out whole or not at all.
    match c.stream.write(request) {
        Ok(n) if n == request.len() => c.in_flight = Some(due),
        _ => tally.errors += 1,
    }
}

/// Reads what arrived; a complete response ends the request in flight.
fn receive(c: &mut Conn, tally: &mut Tally) {
    let mut chunk = [0u8; 4096];
    loop {
        match c.stream.read(&mut chunk) {
            Ok(0) => {
                // The server closed: this connection is done.
                tally.errors += u64::from(c.in_flight.take().is_some());
                c.closed = true;
                return;
            }
            Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                tally.errors += 1;
                c.in_flight = None;
                c.closed = true;
                return;
            }
        }
    }
    while let Some(len) = response_len(&c.buf) {
        c.buf.drain(..len);
        if let Some(due) = c.in_flight.take() {
            tally.latencies_ns.push(due.elapsed().as_nanos() as u64);
        }
    }
    if c.buf.len() > MAX_HEAD {
        tally.errors += 1;
        c.buf.clear();
    }
}

/// Length of the first complete response in `buf` (head plus `Content-Length` body).
fn response_len(buf: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    let body: usize = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .unwrap_or(0);
    let total = head + body;
    (buf.len() >= total).then_some(total)
}

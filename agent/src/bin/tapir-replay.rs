//! `tapir-replay`: Tapir's userspace pipeline alone, without the kernel (benchmark 4 of
//! `cargo xtask bench`).
//!
//! Ring-buffer records — byte-identical to what the kernel programs submit, built from the
//! `agent_common` structs — go through the same [`RecordSink`] → [`Pipeline`] path as in
//! `tapir run` (decode → per-connection state → HTTP pairing → finished exchange), on one
//! thread, as fast as it goes. The records come from one of:
//!
//! - `synth`: N keep-alive connections, each seen from both ends (a server process and a
//!   client process on loopback), doing request/response in round-robin;
//! - `record`: the live ring buffer of this host for a few seconds (root; loads the eBPF
//!   programs like `tapir run`), saved to a file; `replay FILE` feeds such a file.
//!
//! Finished exchanges go to a sink: `count` (nothing more), `json` (the `watch --json`
//! encoding), or `otel` — exactly what `tapir run` does with each exchange on its capture
//! thread (`OtelSink`): service entry, route, RED metrics, span ids, sampling, the span's
//! OTLP encoding and the push into the export queue; only the export task (batching into
//! requests, the network) is left out.
//!
//! One JSON object on stdout gives events/s by wall clock and by the thread's CPU time.
use std::{
    fs::File,
    io::{BufReader, BufWriter, Read, Write},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use agent_common::{
    syscall, ConnEvent, ConnTuple, DataEventHeader, EventHeader, EventKind, Role, TraceIds,
    AF_INET, DIR_EGRESS, DIR_INGRESS, MAX_CAPTURE, ORIGIN_NEW, TRACE_CLIENT, TRACE_SERVER,
};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use tapir::{
    capture::{
        events::{decode, KernelEvent},
        reader::{drain_loop, RecordSink},
    },
    exchange::CapturedExchange,
    http::Direction,
    otel::{OtelSink, OtelStats, QueuedSpan, SharedQueue},
    pipeline::{ExchangeSink, Filter, Pipeline},
    stats::Stats,
};

const FILE_MAGIC: &[u8; 10] = b"TAPIRREC1\n";

#[derive(Parser)]
#[command(about = "Replays ring-buffer records through Tapir's userspace pipeline (benchmark)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Synthesize keep-alive request/response traffic and replay it.
    Synth {
        #[command(flatten)]
        shape: Shape,
        #[command(flatten)]
        replay: ReplayArgs,
        /// Also save the synthesized records to this file (replayable with `replay`).
        #[arg(long)]
        save: Option<PathBuf>,
    },
    /// Record this host's live ring-buffer records to a file (needs root), until the time
    /// or record limit, or SIGINT/SIGTERM. Says `recording` on stderr once attached.
    Record {
        #[arg(long)]
        out: PathBuf,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Stop after this many records.
        #[arg(long, default_value_t = 2_000_000)]
        max_records: u64,
    },
    /// Print a record file's data records, one JSON object per line, without their
    /// bytes: pid, tid, fd, syscall, direction, bytes moved, bytes copied, tail bytes.
    Dump { file: PathBuf },
    /// Replay a file written by `record` or `synth --save`.
    Replay {
        file: PathBuf,
        #[command(flatten)]
        replay: ReplayArgs,
    },
}

#[derive(clap::Args, Clone, Copy)]
struct Shape {
    /// Concurrent keep-alive connections (each is seen from both ends).
    #[arg(long, default_value_t = 256)]
    connections: u32,
    /// Requests per connection.
    #[arg(long, default_value_t = 100)]
    requests: u32,
}

#[derive(clap::Args, Clone, Copy)]
struct ReplayArgs {
    /// Times the whole stream is replayed (a fresh pipeline each time).
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// What happens to each finished exchange.
    #[arg(long, value_enum, default_value_t = SinkKind::Count)]
    sink: SinkKind,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SinkKind {
    /// Count it and drop it: decode → pair → exchange only.
    Count,
    /// Also serialize it to JSON (`watch --json`).
    Json,
    /// Also what `tapir run` does before export: metrics, route, ids, sampling, span.
    Otel,
}

fn main() -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // The same subscriber as `tapir run`, so disabled debug! sites cost what they cost there.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    match Cli::parse().cmd {
        Cmd::Synth {
            shape,
            replay,
            save,
        } => {
            let recs = synthesize(shape);
            if let Some(path) = save {
                recs.save(&path)?;
            }
            let expected = 2 * u64::from(shape.connections) * u64::from(shape.requests);
            let mut out = bench(&recs, replay, Some(expected))?;
            out["connections"] = json!(shape.connections);
            out["requests_per_connection"] = json!(shape.requests);
            out["mode"] = json!("synth");
            println!("{out}");
        }
        Cmd::Replay { file, replay } => {
            let recs = Records::load(&file)?;
            let mut out = bench(&recs, replay, None)?;
            out["mode"] = json!("replay");
            out["file"] = json!(file.display().to_string());
            println!("{out}");
        }
        Cmd::Record {
            out,
            seconds,
            max_records,
        } => record(&out, seconds, max_records)?,
        Cmd::Dump { file } => dump(&Records::load(&file)?)?,
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Records

/// Ring-buffer records, back to back, each starting 8-byte aligned as in the ring buffer.
#[derive(Default)]
struct Records {
    buf: Vec<u8>,
    index: Vec<(usize, usize)>,
    data_events: u64,
}

impl Records {
    fn push(&mut self, bytes: &[u8]) {
        while !self.buf.len().is_multiple_of(8) {
            self.buf.push(0);
        }
        self.index.push((self.buf.len(), bytes.len()));
        self.buf.extend_from_slice(bytes);
        if bytes.first() == Some(&(EventKind::Data as u8)) {
            self.data_events += 1;
        }
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.index.iter().map(|&(o, l)| &self.buf[o..o + l])
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    fn save(&self, path: &Path) -> Result<()> {
        let mut w = RecordWriter::create(path)?;
        for r in self.iter() {
            w.write(r)?;
        }
        w.finish()
    }

    fn load(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let (recs, cut) = Self::read_from(BufReader::new(file))
            .with_context(|| format!("reading {}", path.display()))?;
        if cut {
            eprintln!(
                "tapir-replay: {} ends in a cut-off record (the recording was interrupted); \
                 using the {} whole records before it",
                path.display(),
                recs.len()
            );
        }
        Ok(recs)
    }

    /// The records of a record file, and whether it ends in a cut-off one (left out).
    fn read_from(mut r: impl Read) -> Result<(Self, bool)> {
        let mut magic = [0u8; FILE_MAGIC.len()];
        if r.read_exact(&mut magic).is_err() || &magic != FILE_MAGIC {
            bail!("not a tapir-replay record file (written by `record` or `synth --save`)");
        }
        let mut recs = Records::default();
        let mut len = [0u8; 4];
        let mut rec = Vec::new();
        loop {
            // A clean end falls between records: no byte of the next length.
            match read_full(&mut r, &mut len)? {
                0 => return Ok((recs, false)),
                n if n < len.len() => return Ok((recs, true)),
                _ => {}
            }
            let n = u32::from_le_bytes(len) as usize;
            if n > MAX_RECORD_BYTES {
                bail!(
                    "record {} claims {n} bytes, more than any ring-buffer record",
                    recs.len()
                );
            }
            rec.resize(n, 0);
            if read_full(&mut r, &mut rec)? < n {
                return Ok((recs, true));
            }
            recs.push(&rec);
        }
    }
}

/// Larger than any record the kernel programs submit (a data header and its capture).
const MAX_RECORD_BYTES: usize = 1 << 16;

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

struct RecordWriter {
    out: BufWriter<File>,
    records: u64,
    bytes: u64,
}

impl RecordWriter {
    fn create(path: &Path) -> Result<Self> {
        let mut out = BufWriter::new(
            File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        out.write_all(FILE_MAGIC)?;
        Ok(Self {
            out,
            records: 0,
            bytes: 0,
        })
    }

    fn write(&mut self, rec: &[u8]) -> std::io::Result<()> {
        self.out.write_all(&(rec.len() as u32).to_le_bytes())?;
        self.out.write_all(rec)?;
        self.records += 1;
        self.bytes += rec.len() as u64;
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }
}

fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is one of agent_common's repr(C), padding-free plain-old-data structs; any
    // value of it is a valid byte sequence of size_of::<T>().
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

// ---------------------------------------------------------------------------------------------
// Synthetic traffic

const REQUEST: &[u8] = b"GET /api/v1/items/42?verbose=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\
User-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n\
Date: Wed, 25 Nov 2026 18:37:05 GMT\r\nContent-Type: text/plain\r\nContent-Length: 17\r\n\
Connection: keep-alive\r\n\r\nhello from nginx\n";

struct Side {
    tgid: u32,
    fd: u32,
    sock_id: u64,
    tuple: ConnTuple,
    role: Role,
    comm: [u8; 16],
}

fn comm(name: &str) -> [u8; 16] {
    let mut c = [0u8; 16];
    let n = name.len().min(15);
    c[..n].copy_from_slice(&name.as_bytes()[..n]);
    c
}

fn header(kind: EventKind, side: &Side, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u8,
        tgid: side.tgid,
        tid: side.tgid,
        fd: side.fd,
        ts_ns,
        ..Default::default()
    }
}

fn conn_record(recs: &mut Records, kind: EventKind, side: &Side, ts_ns: u64) {
    let ev = ConnEvent {
        header: header(kind, side, ts_ns),
        sock_id: side.sock_id,
        tuple: side.tuple,
        role: side.role as u8,
        comm: side.comm,
        ..Default::default()
    };
    recs.push(as_bytes(&ev));
}

fn data_record(
    recs: &mut Records,
    scratch: &mut Vec<u8>,
    side: &Side,
    direction: u8,
    payload: &[u8],
    ts_ns: u64,
    trace: TraceIds,
) {
    let captured = payload.len().min(MAX_CAPTURE);
    let hdr = DataEventHeader {
        header: header(EventKind::Data, side, ts_ns),
        sock_id: side.sock_id,
        total: payload.len() as u32,
        captured: captured as u32,
        direction,
        syscall: if direction == DIR_INGRESS {
            syscall::RECVFROM
        } else {
            syscall::WRITEV
        },
        tail_len: 0,
        trace,
        ..Default::default()
    };
    scratch.clear();
    scratch.extend_from_slice(as_bytes(&hdr));
    scratch.extend_from_slice(&payload[..captured]);
    recs.push(scratch);
}

/// Both ends of `connections` loopback connections: accept/connect, `requests` exchanges each
/// in round-robin (client writes the request, server reads it, server writes the response,
/// client reads it), then close. Timestamps advance by 1 µs per event.
fn synthesize(shape: Shape) -> Records {
    let server_pid = std::process::id();
    // A second real pid, so that both processes resolve through /proc once.
    let client_pid = std::os::unix::process::parent_id();
    let lo = {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[127, 0, 0, 1]);
        a
    };
    let mut pairs = Vec::new();
    for i in 0..shape.connections {
        let client_port = 40000 + (i % 20000) as u16;
        let tuple = ConnTuple {
            family: AF_INET,
            local_port: 8080,
            remote_port: client_port,
            local_addr: lo,
            remote_addr: lo,
            ..Default::default()
        };
        let server = Side {
            tgid: server_pid,
            fd: 100 + i,
            sock_id: 0xffff_8880_1000_0000 + u64::from(i) * 0x1000,
            tuple,
            role: Role::Server,
            comm: comm("nginx"),
        };
        let client = Side {
            tgid: client_pid,
            fd: 100 + i,
            sock_id: 0xffff_8880_2000_0000 + u64::from(i) * 0x1000,
            tuple: ConnTuple {
                local_port: client_port,
                remote_port: 8080,
                ..tuple
            },
            role: Role::Client,
            comm: comm("wrk"),
        };
        pairs.push((server, client));
    }
    let mut recs = Records::default();
    let mut scratch = Vec::with_capacity(256);
    let mut ts: u64 = 1_000_000_000;
    let mut tick = || {
        ts += 1000;
        ts
    };
    // The kernel gives each request start fresh ids (a root: no incoming traceparent).
    let mut seq: u64 = 0;
    let mut ids = |kind: u8| {
        seq += 1;
        let x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&x.to_be_bytes());
        trace_id[8..].copy_from_slice(&seq.to_be_bytes());
        TraceIds {
            trace_id,
            span_id: x.rotate_left(17).to_be_bytes(),
            flags: 1,
            kind,
            origin: ORIGIN_NEW,
            ..Default::default()
        }
    };
    for (s, c) in &pairs {
        conn_record(&mut recs, EventKind::ConnOpen, c, tick());
        conn_record(&mut recs, EventKind::ConnOpen, s, tick());
    }
    for _ in 0..shape.requests {
        for (s, c) in &pairs {
            let none = TraceIds::default();
            let (client_ids, server_ids) = (ids(TRACE_CLIENT), ids(TRACE_SERVER));
            data_record(
                &mut recs,
                &mut scratch,
                c,
                DIR_EGRESS,
                REQUEST,
                tick(),
                client_ids,
            );
            data_record(
                &mut recs,
                &mut scratch,
                s,
                DIR_INGRESS,
                REQUEST,
                tick(),
                server_ids,
            );
            data_record(
                &mut recs,
                &mut scratch,
                s,
                DIR_EGRESS,
                RESPONSE,
                tick(),
                none,
            );
            data_record(
                &mut recs,
                &mut scratch,
                c,
                DIR_INGRESS,
                RESPONSE,
                tick(),
                none,
            );
        }
    }
    for (s, c) in &pairs {
        conn_record(&mut recs, EventKind::ConnClose, c, tick());
        conn_record(&mut recs, EventKind::ConnClose, s, tick());
    }
    recs
}

// ---------------------------------------------------------------------------------------------
// Replay

struct BenchSink {
    kind: SinkKind,
    exchanges: u64,
    json_bytes: u64,
    spans: u64,
    otel: Option<(OtelSink, Arc<SharedQueue<QueuedSpan>>)>,
}

impl BenchSink {
    fn new(kind: SinkKind, capture: Arc<Stats>) -> Self {
        Self {
            kind,
            exchanges: 0,
            json_bytes: 0,
            spans: 0,
            otel: (kind == SinkKind::Otel)
                .then(|| OtelSink::without_export(capture, Arc::new(OtelStats::default()))),
        }
    }
}

impl ExchangeSink for BenchSink {
    fn on_exchange(&mut self, ex: &CapturedExchange) {
        self.exchanges += 1;
        match self.kind {
            SinkKind::Count => {}
            SinkKind::Json => self.json_bytes += ex.to_json().to_string().len() as u64,
            SinkKind::Otel => {
                if let Some((sink, queue)) = &mut self.otel {
                    let before = queue.pushed();
                    sink.on_exchange(ex);
                    self.spans += queue.pushed() - before;
                    return;
                }
            }
        }
        std::hint::black_box(ex);
    }

    fn flush(&mut self) {
        if let Some((sink, queue)) = &mut self.otel {
            let before = queue.pushed();
            sink.flush();
            self.spans += queue.pushed() - before;
        }
    }
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn max_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// How often the drain loop's `on_idle` runs in `tapir run`, in records, roughly: a drain
/// of 10 ms at a few hundred thousand events/s.
const RECORDS_PER_DRAIN: usize = 4096;

fn bench(recs: &Records, args: ReplayArgs, expected: Option<u64>) -> Result<serde_json::Value> {
    if recs.len() == 0 {
        bail!("no records to replay");
    }
    let mut rounds = Vec::new();
    let mut wall_rates = Vec::new();
    let mut cpu_rates = Vec::new();
    let mut exchanges = 0;
    let mut spans = 0;
    let mut stats_out = Vec::new();
    for _ in 0..args.rounds.max(1) {
        let stats = Arc::new(Stats::default());
        let sink = BenchSink::new(args.sink, stats.clone());
        let mut pipeline = Pipeline::new(65536, Filter::default(), stats.clone(), sink);
        let cpu0 = thread_cpu_ns();
        let t0 = Instant::now();
        for (i, r) in recs.iter().enumerate() {
            pipeline.on_record(r);
            if i % RECORDS_PER_DRAIN == RECORDS_PER_DRAIN - 1 {
                pipeline.on_idle();
            }
        }
        pipeline.on_idle();
        let wall = t0.elapsed().as_secs_f64();
        let cpu = (thread_cpu_ns() - cpu0) as f64 / 1e9;
        exchanges = pipeline.sink_mut().exchanges;
        spans = pipeline.sink_mut().spans;
        let n = recs.len() as f64;
        wall_rates.push(n / wall);
        cpu_rates.push(n / cpu.max(1e-9));
        rounds.push(json!({"wall_s": wall, "cpu_s": cpu, "exchanges": exchanges}));
        stats_out = stats.snapshot();
        let drops: u64 = stats.http_drops().iter().map(|(_, n)| n).sum();
        stats_out.push(("http_drops", drops));
    }
    if let Some(want) = expected {
        if exchanges != want {
            bail!("the pipeline produced {exchanges} exchanges, expected {want}");
        }
    }
    let (wmin, wmax) = min_max(&wall_rates);
    let (cmin, cmax) = min_max(&cpu_rates);
    let cpu_med = median(&mut cpu_rates.clone());
    Ok(json!({
        "records": recs.len(),
        "data_events": recs.data_events,
        "bytes": recs.buf.len(),
        "exchanges": exchanges,
        "spans": spans,
        "sink": match args.sink {
            SinkKind::Count => "count",
            SinkKind::Json => "json",
            SinkKind::Otel => "otel",
        },
        "rounds": rounds,
        "events_per_s_wall_median": median(&mut wall_rates.clone()),
        "events_per_s_wall_min": wmin,
        "events_per_s_wall_max": wmax,
        "events_per_s_cpu_median": cpu_med,
        "events_per_s_cpu_min": cmin,
        "events_per_s_cpu_max": cmax,
        "ns_per_event_cpu_median": 1e9 / cpu_med,
        "max_rss_kib": max_rss_kib(),
        // Inline size of one tracked connection (heap parts come on top).
        "conn_struct_bytes": std::mem::size_of::<tapir::pipeline::Conn>(),
        "stats": stats_out
            .into_iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<serde_json::Map<_, _>>(),
    }))
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        })
}

// ---------------------------------------------------------------------------------------------
// Recording

struct Recorder {
    w: RecordWriter,
    max: u64,
    stop: Arc<AtomicBool>,
    error: Option<std::io::Error>,
}

impl RecordSink for Recorder {
    fn on_record(&mut self, bytes: &[u8]) {
        if self.w.records >= self.max || self.error.is_some() {
            self.stop.store(true, Ordering::Release);
            return;
        }
        if let Err(e) = self.w.write(bytes) {
            self.error = Some(e);
        }
    }

    fn on_idle(&mut self) {}
}

type NoExtra = Option<(OwnedFd, Box<dyn FnMut(&mut OwnedFd) + Send>)>;

/// Set by SIGINT/SIGTERM during `record`.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::Release);
}

/// SIGINT and SIGTERM end a recording (the file is then finished as usual).
fn stop_on_signal() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        let prev = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        if prev == libc::SIG_ERR {
            bail!("installing a handler for signal {sig} failed");
        }
    }
    Ok(())
}

/// `dump`: what each data record says, without its bytes.
fn dump(recs: &Records) -> Result<()> {
    let mut out = BufWriter::new(std::io::stdout().lock());
    for r in recs.iter() {
        let Ok(KernelEvent::Data(d)) = decode(r) else {
            continue;
        };
        let h = &d.header;
        writeln!(
            out,
            "{}",
            json!({
                "pid": h.header.tgid,
                "tid": h.header.tid,
                "fd": h.header.fd,
                "syscall": syscall::name(h.syscall),
                "direction": match Direction::from_raw(h.direction) {
                    Some(Direction::Ingress) => "ingress",
                    Some(Direction::Egress) => "egress",
                    None => "?",
                },
                "total": h.total,
                "captured": h.captured,
                "tail": h.tail_len,
            })
        )?;
    }
    out.flush()?;
    Ok(())
}

fn record(out: &Path, seconds: f64, max_records: u64) -> Result<()> {
    let mut attached = tapir::loader::load_and_attach(&tapir::loader::LoadOptions::default())
        .context("loading the eBPF programs (run as root; `tapir doctor` tells what is missing)")?;
    let rings = tapir::capture::reader::take_rings(&mut attached)?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut rec = Recorder {
        w: RecordWriter::create(out)?,
        max: max_records,
        stop: stop.clone(),
        error: None,
    };
    stop_on_signal()?;
    let timer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs_f64(seconds.max(0.0));
            while Instant::now() < end
                && !stop.load(Ordering::Acquire)
                && !SIGNALLED.load(Ordering::Acquire)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            stop.store(true, Ordering::Release);
        })
    };
    eprintln!(
        "tapir-replay: recording to {} for {seconds} s",
        out.display()
    );
    drain_loop(rings, &mut rec, &stop, NoExtra::None, None);
    let _ = timer.join();
    drop(attached);
    if let Some(e) = rec.error {
        return Err(e).context("writing the record file");
    }
    let (records, bytes) = (rec.w.records, rec.w.bytes);
    rec.w.finish()?;
    println!(
        "{}",
        json!({"mode": "record", "file": out.display().to_string(), "records": records, "bytes": bytes})
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(records: &[&[u8]]) -> Vec<u8> {
        let mut out = FILE_MAGIC.to_vec();
        for r in records {
            out.extend((r.len() as u32).to_le_bytes());
            out.extend_from_slice(r);
        }
        out
    }

    #[test]
    fn reads_whole_files_and_keeps_what_precedes_a_cut() {
        let whole = file(&[b"abc", b"", b"defgh"]);
        let (recs, cut) = Records::read_from(&whole[..]).unwrap();
        assert!(!cut);
        assert_eq!(
            recs.iter().collect::<Vec<_>>(),
            [&b"abc"[..], b"", b"defgh"]
        );
        // Cut inside the last record, then inside its length.
        for end in [whole.len() - 1, whole.len() - 7] {
            let (recs, cut) = Records::read_from(&whole[..end]).unwrap();
            assert!(cut, "{end}");
            assert_eq!(recs.len(), 2, "{end}");
        }
        assert!(Records::read_from(&FILE_MAGIC[..]).is_ok_and(|(r, cut)| r.len() == 0 && !cut));
    }

    #[test]
    fn refuses_other_files_and_absurd_lengths() {
        for bad in [&b""[..], b"TAPIR", b"hostname\n and more text"] {
            let err = Records::read_from(bad).err().unwrap();
            assert!(
                err.to_string().contains("not a tapir-replay record file"),
                "{err}"
            );
        }
        let mut huge = FILE_MAGIC.to_vec();
        huge.extend(u32::MAX.to_le_bytes());
        let err = Records::read_from(&huge[..]).err().unwrap();
        assert!(
            err.to_string().contains("more than any ring-buffer record"),
            "{err}"
        );
    }
}

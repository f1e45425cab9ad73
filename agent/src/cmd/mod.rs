//! One module per subcommand; shared start-up/shutdown plumbing here.
pub mod doctor;
pub mod run;
pub mod watch;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{self, RecvTimeoutError},
        Arc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result};
use clap::Args;
use tapir::{
    loader::{self, Attached, LoadOptions, SelectionRescan},
    select::Selection,
};
use tracing_subscriber::EnvFilter;

/// Logs go to stderr; RUST_LOG picks the level (e.g. `RUST_LOG=debug`, `RUST_LOG=tapir=trace`).
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Capture options shared by `run` and `watch`.
#[derive(Args, Debug, Clone)]
pub struct CaptureArgs {
    /// Bytes of a message's head copied from a read/write syscall (max 8192). Headers
    /// beyond this in a single syscall are lost. Of a body in a syscall over 1 KiB, only 64
    /// bytes and the syscall's last 16 are copied, whatever this says.
    #[arg(long, env = "TAPIR_CAPTURE_BYTES", default_value_t = agent_common::DEFAULT_CAPTURE)]
    pub capture_bytes: u32,
    /// Kernel → agent ring buffer bytes in all, shared out evenly among one ring per CPU
    /// (up to 16 rings; each rounded down to a power of two). When a CPU's ring is full,
    /// its events are dropped and counted (tapir.kernel.ringbuf_full). It shows twice in
    /// the agent's RSS (the kernel maps each ring twice in a row for wrap-around). The
    /// default holds about 200 ms of events at 50k requests/s seen from both ends.
    #[arg(long, env = "TAPIR_RINGBUF_BYTES", default_value_t = 8 << 20)]
    pub ringbuf_bytes: u32,
    /// Connections tracked at once (kernel and agent). The least recently used are evicted.
    #[arg(long, env = "TAPIR_MAX_CONNECTIONS", default_value_t = 65536)]
    pub max_connections: u32,
    /// Only observe this process and the processes it forks (repeatable; default: every
    /// process). Others' socket syscalls stop at a map lookup in the kernel.
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Only observe processes running this program, by file name: the executable's
    /// (`/proc/PID/exe`) or the process name (`comm`, as `ps -e` shows it), e.g. `--exe nginx
    /// --exe python3`. Repeatable, or comma-separated in the env. Processes they fork are
    /// observed too, until they exec another program; programs started later are picked up
    /// at exec by their process name (the file name they were started by, of which the
    /// kernel keeps 15 characters). A glob pattern (`'python3*'`, `'*node*'`, `'[a-c]?'`)
    /// matches the same names; programs started later are matched by the agent within
    /// ~0.2 s of their exec (the kernel matches exact names only), so their first requests
    /// may be missed. Combines with --pid (either selects).
    #[arg(
        long = "exe",
        value_name = "NAME",
        env = "TAPIR_EXE",
        value_delimiter = ','
    )]
    pub exe_names: Vec<String>,
    /// Never observe processes running this program (an exact name, matched as for --exe;
    /// repeatable, or comma-separated). Wins over --exe and --pid. Replaces the default
    /// list, telemetry collectors and eBPF agents, whose OTLP/HTTP receivers would
    /// otherwise turn every export into a span; `--exclude-exe none` observes them too.
    #[arg(
        long = "exclude-exe",
        value_name = "NAME",
        env = "TAPIR_EXCLUDE_EXE",
        value_delimiter = ',',
        default_values_t = tapir::select::DEFAULT_EXCLUDED.iter().map(|s| s.to_string())
    )]
    pub exclude_exe_names: Vec<String>,
    /// Only observe processes that listen on this TCP port, and what they fork from then
    /// on (nginx's and gunicorn's workers), as OBI's open-port selection does: a port, a
    /// range (`8000-8099`) or a comma-separated list; repeatable. Those listening when
    /// Tapir starts are found in /proc, those that start listening later by the kernel
    /// at listen(), before their first connection. All their connections are observed,
    /// their outgoing calls included (--port limits connections instead). Combines with
    /// --pid and --exe (any selects); --exclude-exe still wins.
    #[arg(
        long = "open-port",
        value_name = "PORTS",
        env = "TAPIR_OPEN_PORT",
        value_delimiter = ','
    )]
    pub open_ports: Vec<String>,
    /// Do not read HTTPS through OpenSSL. By default uprobes on OpenSSL's read and write
    /// (in every libssl.so that a running process maps, at the usual system paths, and in
    /// programs that carry OpenSSL and export it, as Node.js does) see the plaintext of
    /// processes that use OpenSSL (nginx, Apache, Python, curl, Ruby, PHP, Node.js); each
    /// SSL call then costs the calling process a uprobe round trip (about 1.5 µs on a
    /// small VM), observed or not. Programs with a TLS stack of their own (Go, Java,
    /// rustls, BoringSSL) stay unread either way.
    #[arg(long, env = "TAPIR_NO_TLS")]
    pub no_tls: bool,
}

impl CaptureArgs {
    /// `ports`: the `--port` filter. When given, injection is limited to connections to
    /// those ports (plus `--inject-port`) instead of every port seen carrying HTTP.
    pub fn load_options(&self, inject: &InjectArgs, ports: &[u16]) -> Result<LoadOptions> {
        let mut inject_ports = inject.inject_ports.clone();
        inject_ports.extend_from_slice(ports);
        let selection = Selection::new(self.pids.clone(), &self.exe_names, &self.exclude_exe_names)
            .and_then(|s| s.with_open_ports(&self.open_ports))
            .map_err(anyhow::Error::msg)?;
        Ok(LoadOptions {
            capture_bytes: self.capture_bytes,
            ringbuf_bytes: self.ringbuf_bytes,
            max_connections: self.max_connections,
            inject: inject.enabled(),
            inject_ports,
            inject_learn: ports.is_empty(),
            selection,
            tls: !self.no_tls,
        })
    }
}

/// traceparent injection into outgoing requests (flags shared by `run` and `watch`).
#[derive(Args, Debug, Clone)]
pub struct InjectArgs {
    /// Do not insert `traceparent` into outgoing HTTP/1.x requests (then only requests
    /// that already carry one link to their downstream service).
    #[arg(long, env = "TAPIR_NO_INJECT", conflicts_with = "inject")]
    pub no_inject: bool,
    /// Insert `traceparent` into outgoing requests (the default for `run`; `watch` only
    /// observes unless this is given).
    #[arg(long)]
    pub inject: bool,
    /// Destination port to inject into from the first connection on (repeatable). Other
    /// HTTP ports are learned from the traffic: the first connection to a port nobody has
    /// used for HTTP since Tapir started is not injected. With --port, only those ports
    /// and these are injected into.
    #[arg(long = "inject-port", value_name = "PORT")]
    pub inject_ports: Vec<u16>,
    /// Set by the subcommand: whether injection is on unless --no-inject/--inject says.
    #[arg(skip)]
    pub default_on: bool,
}

impl InjectArgs {
    pub fn enabled(&self) -> bool {
        !self.no_inject && (self.inject || self.default_on)
    }
}

/// Loads and attaches the probes, reporting on stderr any that could not be attached.
pub fn attach(args: &CaptureArgs, inject: &InjectArgs, ports: &[u16]) -> Result<Attached> {
    let attached = loader::load_and_attach(&args.load_options(inject, ports)?)
        .context("starting the eBPF probes (`tapir doctor` tells what this host lacks)")?;
    match (&attached.injection, inject.enabled()) {
        (Ok(()), _) => {
            tracing::info!("traceparent injection into outgoing HTTP/1.x requests is on")
        }
        (Err(why), true) => eprintln!(
            "tapir: warning: traceparent injection unavailable ({why}); downstream services will \
             only join traces when the caller already sends a traceparent"
        ),
        (Err(_), false) => {}
    }
    match &attached.tls {
        Ok(libs) => tracing::info!(
            "reading TLS through OpenSSL: its read and write probed in {}",
            libs.iter()
                .map(|l| l.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Err(why) if attached.tls_wanted() => tracing::info!(
            "TLS is not read yet ({why}); libssl files that appear are probed within {} s",
            tls_rescan_every().as_secs()
        ),
        Err(why) if !args.no_tls => eprintln!(
            "tapir: warning: TLS is not read ({why}); HTTPS connections are counted \
             (tapir.connections.unreadable.tls), not captured"
        ),
        Err(_) => {}
    }
    // Checked once ours are loaded: an agent that has just stopped is gone by then.
    match tapir::other_agents::foreign_programs(
        &tapir::other_agents::own_programs(&attached.ebpf),
        false,
    ) {
        Ok(0) => {}
        Ok(n) => eprintln!("tapir: warning: {}", tapir::other_agents::describe(n)),
        Err(e) => tracing::debug!("not looking for other agents: {e}"),
    }
    let programs = loader::Programs::for_this_kernel();
    if programs != loader::Programs::Standard {
        // What the compat programs miss (a traceparent late in a long head, injection into
        // requests with long heads) is in the README; the counters show the injection side.
        eprintln!(
            "tapir: note: using the {} (see the README's requirements)",
            programs.describe()
        );
    }
    if attached.tracefs == tapir::tracefs::TracefsState::MountedNow {
        tracing::info!(
            "tracefs was not mounted: mounted it at {}",
            tapir::tracefs::TRACEFS
        );
    }
    for f in &attached.failures {
        eprintln!(
            "tapir: warning: probe {} ({}) not attached: {}; without it: {}",
            f.probe.program,
            loader::hook_name(&f.probe.hook),
            f.error,
            f.probe.without
        );
    }
    Ok(attached)
}

/// SIGINT/SIGTERM listeners, registered as soon as this is created: create it before
/// saying `ready`, so that a signal sent right after is never met by the default action
/// (which would kill the agent without detaching or flushing).
pub struct ShutdownSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Must be called inside a tokio runtime (`Runtime::enter`).
    pub fn register() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        })
    }

    pub async fn wait(mut self) {
        tokio::select! {
            _ = self.int.recv() => {},
            _ = self.term.recv() => {},
        }
    }

    /// Waits for SIGINT/SIGTERM, meanwhile putting the TLS probes on libssl files that
    /// appear (new containers) every [`tls_rescan_every`].
    pub fn wait_rescanning_tls(self, rt: &tokio::runtime::Runtime, attached: &mut Attached) {
        let wait = self.wait();
        tokio::pin!(wait);
        rt.block_on(async {
            let mut tick = tokio::time::interval(tls_rescan_every());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = &mut wait => return,
                    _ = tick.tick() => {
                        for lib in loader::rescan_tls(attached) {
                            tracing::info!("reading TLS through OpenSSL in {} too", lib.display());
                        }
                    }
                }
            }
        });
    }
}

/// How often libssl files that appeared since start-up are looked for (the scan reads
/// every process's /proc/PID/maps: ~0.1 ms per process). `TAPIR_TLS_RESCAN_SECS` sets it.
fn tls_rescan_every() -> Duration {
    let secs = std::env::var("TAPIR_TLS_RESCAN_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .unwrap_or(30);
    Duration::from_secs(secs)
}

/// The capture thread plus the flag that stops it.
pub struct CaptureThread {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<()>,
}

impl CaptureThread {
    pub fn spawn(f: impl FnOnce(Arc<AtomicBool>) + Send + 'static) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = thread::Builder::new()
            .name("tapir-capture".into())
            .spawn(move || f(s))
            .context("starting the capture thread")?;
        Ok(Self { stop, handle })
    }

    /// Asks the thread to drain what is pending and stop, then waits for it.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.handle.join();
    }
}

/// How often the processes that exec'd are matched against `--exe` patterns.
const RESCAN_EVERY: Duration = Duration::from_millis(200);

/// The thread that runs [`SelectionRescan`] (only with `--exe` patterns or `--open-port`).
pub struct RescanThread {
    stop: mpsc::Sender<()>,
    handle: thread::JoinHandle<()>,
}

impl RescanThread {
    pub fn spawn(attached: &mut Attached) -> Result<Option<Self>> {
        let Some(mut rescan) = SelectionRescan::take(attached)? else {
            return Ok(None);
        };
        let (stop, stopped) = mpsc::channel::<()>();
        let handle = thread::Builder::new()
            .name("tapir-select".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(RESCAN_EVERY) {
                    if let Err(e) = rescan.rescan() {
                        tracing::warn!(error = %e, "scanning /proc for --exe patterns or --open-port");
                    }
                }
            })
            .context("starting the process rescan thread")?;
        Ok(Some(Self { stop, handle }))
    }

    pub fn stop(self) {
        drop(self.stop);
        let _ = self.handle.join();
    }
}

type Logger = aya_log::EbpfLogger<&'static dyn log::Log>;
type LogFlush = Box<dyn FnMut(&mut Logger) + Send>;

/// eBPF-side logs (aya-log), forwarded to our log at their level (debug).
pub fn take_logger(attached: &mut Attached) -> Option<(Logger, LogFlush)> {
    match aya_log::EbpfLogger::init(&mut attached.ebpf) {
        Ok(l) => Some((l, Box::new(|l: &mut Logger| l.flush()))),
        Err(e) => {
            tracing::debug!(error = %e, "no eBPF log buffer");
            None
        }
    }
}

/// What the capture thread reads from the kernel besides the ring buffer: the drop and
/// injection counters, and the injection maps for re-arming kept-alive client connections
/// (only when injection is on). Taken out of the loaded object on the main thread, handed
/// to the pipeline on the capture thread.
pub struct PipelineMaps {
    counters: Option<aya::maps::PerCpuArray<aya::maps::MapData, u64>>,
    inject_counters: Option<aya::maps::PerCpuArray<aya::maps::MapData, u64>>,
    rearm: Option<tapir::rearm::InjectionMaps>,
    /// The TLS library probes are attached.
    tls_probes: bool,
}

impl PipelineMaps {
    pub fn take(attached: &mut Attached) -> Self {
        let counters = attached
            .ebpf
            .take_map(agent_common::names::COUNTERS)
            .and_then(|map| {
                aya::maps::PerCpuArray::try_from(map)
                    .map_err(|e| tracing::warn!(error = %e, "kernel counters unavailable"))
                    .ok()
            });
        let inject_counters = attached
            .ebpf
            .take_map("TAPIR_INJ_COUNTERS")
            .and_then(|map| aya::maps::PerCpuArray::try_from(map).ok());
        Self {
            counters,
            inject_counters,
            rearm: Self::take_rearm(attached),
            tls_probes: attached.tls_wanted(),
        }
    }

    fn take_rearm(attached: &mut Attached) -> Option<tapir::rearm::InjectionMaps> {
        attached.injection.as_ref().ok()?;
        Some(tapir::rearm::InjectionMaps {
            socks: attached.ebpf.take_map("TAPIR_INJ_SOCKS")?,
            state: attached.ebpf.take_map("TAPIR_INJ_STATE")?,
            rearm: attached.ebpf.take_map("TAPIR_INJ_REARM")?,
        })
    }

    pub fn install<S: tapir::pipeline::ExchangeSink>(
        self,
        pipeline: &mut tapir::pipeline::Pipeline<S>,
        stats: Arc<tapir::stats::Stats>,
    ) {
        if let Some(c) = self.counters {
            pipeline.set_kernel_counters(c);
        }
        if let Some(c) = self.inject_counters {
            pipeline.set_inject_counters(c);
        }
        pipeline.set_tls_probes(self.tls_probes);
        let Some(maps) = self.rearm else { return };
        match tapir::rearm::Rearm::new(maps, stats) {
            Ok(r) => pipeline.set_rearm(r),
            Err(e) => tracing::warn!(
                error = %e,
                "kept-alive connections will only have their first request injected"
            ),
        }
    }
}

/// The agent's own counters at exit, on stderr (drops and kernel events never go unsaid).
pub fn log_final_counts(stats: &tapir::stats::Stats) {
    for (name, value) in stats.snapshot() {
        tracing::info!(counter = name, value, "final count");
    }
    for (reason, value) in stats.http_drops() {
        tracing::info!(counter = "tapir.http.dropped", reason, value, "final count");
    }
    for c in stats.programs.get().map(|p| p.read()).unwrap_or_default() {
        let mean_ns = c.run_time_ns.checked_div(c.runs).unwrap_or(0);
        tracing::info!(
            program = c.program,
            runs = c.runs,
            run_time_ns = c.run_time_ns,
            mean_ns,
            "kernel program cost"
        );
    }
}

//! Loads the embedded eBPF object with this kernel's struct offsets and attaches every
//! probe in [`crate::probes::PROBES`].
use std::{
    borrow::BorrowMut,
    collections::HashSet,
    time::{Duration, Instant},
};

use agent_common::{
    names,
    select::{BY_PORT, EXCLUDED},
    KernelOffsets, EVENT_RINGS, MAX_CAPTURE,
};
use aya::{
    maps::MapData,
    programs::{trace_point::TracePointLinkId, uprobe::UProbeLinkId, TracePoint, UProbe},
    Ebpf, EbpfLoader,
};
use thiserror::Error;

use crate::{
    btf::{self, Btf},
    probes::{
        program_names, unique_programs, Hook, Probe, PROBES, SK_MSG_PROGRAM, SOCK_OPS_PROGRAM,
    },
    select::{children, read_proc, scan_proc, ProcEntry, Selection},
    tracefs::{self, TracefsState},
};

/// The eBPF object built by `cargo xtask build`, embedded at compile time.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tapir.bpf.o"));
/// Its `compat` build, for kernels without `bpf_loop` (5.10 to 5.16): bounded loops that
/// look at a head's first COMPAT_SCAN_BYTES, and syscall arguments read from the kernel
/// stack.
static EBPF_COMPAT_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tapir-compat.bpf.o"));

/// Forces the compat programs on a kernel that has `bpf_loop` (tests; troubleshooting).
pub const COMPAT_ENV: &str = "TAPIR_EBPF_COMPAT";

/// Which build of the eBPF programs this kernel gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Programs {
    /// Kernels with `bpf_loop`, `bpf_task_pt_regs` and `bpf_get_current_task_btf` (5.17
    /// and later, or a distribution kernel with them backported).
    Standard,
    /// Kernels without it, or `TAPIR_EBPF_COMPAT=1` (`forced`).
    Compat { forced: bool },
}

impl Programs {
    /// Decided once per process: a probe program load, and the environment.
    pub fn for_this_kernel() -> Self {
        static CHOSEN: std::sync::OnceLock<Programs> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let forced = std::env::var(COMPAT_ENV).is_ok_and(|v| v == "1" || v == "true");
            // The standard build calls these; a distribution kernel may have backported
            // some of them. A probe that cannot run at all (refused for another reason)
            // leaves the kernel's version to decide.
            use aya::sys::BpfHelper as H;
            let recent = std::sync::LazyLock::new(|| {
                kernel_at_least(&crate::doctor::kernel_release(), (5, 17))
            });
            let standard_runs = [
                H::BPF_FUNC_loop,
                H::BPF_FUNC_task_pt_regs,
                H::BPF_FUNC_get_current_task_btf,
            ]
            .into_iter()
            .all(|helper| {
                aya::sys::is_helper_supported(aya::programs::ProgramType::TracePoint, helper)
                    .unwrap_or_else(|_| *recent)
            });
            if forced || !standard_runs {
                Programs::Compat { forced }
            } else {
                Programs::Standard
            }
        })
    }

    fn object(self) -> &'static [u8] {
        match self {
            Programs::Standard => EBPF_OBJECT,
            Programs::Compat { .. } => EBPF_COMPAT_OBJECT,
        }
    }

    /// For logs and `tapir doctor`.
    pub fn describe(self) -> String {
        let why = match self {
            Programs::Standard => return "standard build".into(),
            Programs::Compat { forced: false } => " for kernels without bpf_loop",
            Programs::Compat { forced: true } => ", forced by TAPIR_EBPF_COMPAT",
        };
        // The limit the compat programs are built with.
        let kib = agent_common::COMPAT_SCAN_BYTES / 1024;
        format!("compat build{why}: heads scanned up to {kib} KiB")
    }
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Payload bytes copied per syscall (clamped to MAX_CAPTURE).
    pub capture_bytes: u32,
    /// Ring buffer bytes in all, shared out among the CPUs' rings ([`event_rings`]).
    pub ringbuf_bytes: u32,
    /// Connections the kernel tracks at once.
    pub max_connections: u32,
    /// Insert `traceparent` into outgoing HTTP/1.x requests (sock_ops + sk_msg).
    pub inject: bool,
    /// Destination ports whose connections get injection from the start (others are
    /// learned from the traffic).
    pub inject_ports: Vec<u16>,
    /// Learn HTTP ports from traffic (off when the user limited Tapir to some ports).
    pub inject_learn: bool,
    /// The processes observed (`--pid`, `--exe`); empty: all of them.
    pub selection: Selection,
    /// Read TLS plaintext through uprobes on OpenSSL's libssl.
    pub tls: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            capture_bytes: agent_common::DEFAULT_CAPTURE,
            ringbuf_bytes: 8 << 20,
            max_connections: 65536,
            inject: false,
            inject_ports: Vec::new(),
            inject_learn: true,
            selection: Selection::default(),
            tls: true,
        }
    }
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(
        "this tapir binary was built without its eBPF programs; build it with `cargo xtask build`"
    )]
    NoObject,
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
    #[error("reading kernel BTF (/sys/kernel/btf/vmlinux; needs CONFIG_DEBUG_INFO_BTF=y)")]
    Btf(#[source] btf::BtfError),
    #[error("loading the eBPF programs into the kernel (run as root, or with CAP_BPF + CAP_PERFMON + CAP_SYS_ADMIN)")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("required probe {program} ({hook}) could not be attached: {error}")]
    RequiredProbe {
        program: &'static str,
        hook: String,
        error: String,
    },
    #[error("setting up the process selection (--pid / --exe): {0}")]
    Select(String),
}

#[derive(Debug, Clone)]
pub struct ProbeFailure {
    pub probe: Probe,
    pub error: String,
}

pub struct Attached {
    /// Owns programs, links and maps: dropping it detaches everything.
    pub ebpf: Ebpf,
    pub failures: Vec<ProbeFailure>,
    pub tracefs: TracefsState,
    pub offsets: KernelOffsets,
    /// Whether traceparent injection is active, or why not.
    pub injection: Result<(), String>,
    /// The processes chosen (see [`SelectionRescan`]).
    pub selection: Selection,
    /// How many of the event rings the CPUs write to ([`event_rings`]).
    pub rings_used: usize,
    /// The files (libssl, programs carrying OpenSSL) whose read and write are probed, or
    /// why none are.
    pub tls: Result<Vec<std::path::PathBuf>, String>,
    /// Every file looked at for OpenSSL (device, inode), probed or not: [`rescan_tls`]
    /// skips them.
    tls_seen: HashSet<(u64, u64)>,
    /// The TLS probes are wanted (no --no-tls) and their programs loaded.
    tls_wanted: bool,
    /// The tracepoint and uprobe attachments, by program: detached together on drop.
    links: Vec<LinkId>,
}

/// One attachment of a program, to be taken back from it and detached.
enum LinkId {
    TracePoint(&'static str, TracePointLinkId),
    UProbe(&'static str, UProbeLinkId),
}

impl LinkId {
    /// The link itself, taken from its program (dropping it detaches).
    fn take(self, ebpf: &mut Ebpf) -> Option<Box<dyn Send>> {
        match self {
            LinkId::TracePoint(name, id) => program::<TracePoint>(ebpf, name)
                .ok()?
                .take_link(id)
                .ok()
                .map(|l| Box::new(l) as Box<dyn Send>),
            LinkId::UProbe(name, id) => program::<UProbe>(ebpf, name)
                .ok()?
                .take_link(id)
                .ok()
                .map(|l| Box::new(l) as Box<dyn Send>),
        }
    }
}

impl Drop for Attached {
    /// Detaches the tracepoints and uprobes all at once, then the rest with `ebpf`. Each
    /// detach waits for the kernel's RCU grace periods (~90 ms on a small VM): one after
    /// the other, 20 tracepoints held shutdown for ~1.8 s and 8 uprobes (two libssl files)
    /// ~0.9 s more. Side by side the tracepoints take ~0.9 s: the kernel still takes them
    /// one at a time under its event mutex, but the rest of each detach overlaps.
    fn drop(&mut self) {
        let started = Instant::now();
        let links: Vec<_> = std::mem::take(&mut self.links)
            .into_iter()
            .filter_map(|id| id.take(&mut self.ebpf))
            .collect();
        let n = links.len();
        std::thread::scope(|scope| {
            for link in links {
                // A thread that cannot start leaves its link to be dropped here.
                let _ = std::thread::Builder::new()
                    .name("tapir-detach".into())
                    .spawn_scoped(scope, move || drop(link));
            }
        });
        tracing::debug!(
            links = n,
            ms = started.elapsed().as_millis() as u64,
            "tracepoints and uprobes detached"
        );
    }
}

pub fn has_embedded_object() -> bool {
    !Programs::for_this_kernel().object().is_empty()
}

pub fn hook_name(hook: &Hook) -> String {
    match hook {
        Hook::TracePoint(cat, name) => format!("tracepoint {cat}/{name}"),
    }
}

pub fn kernel_offsets() -> Result<KernelOffsets, LoadError> {
    let btf = Btf::from_sys_fs().map_err(LoadError::Btf)?;
    btf::kernel_offsets(&btf).map_err(LoadError::Btf)
    // The parsed BTF (tens of MB) is dropped here, before anything else is allocated.
}

/// Bytes each CPU writes to its ring before it wakes the reader: all CPUs together stay
/// well inside the rings (a quarter of them), between 64 KiB and 1 MiB each.
fn wakeup_bytes(ringbuf_bytes: u32) -> u64 {
    wakeup_bytes_for(ringbuf_bytes, aya::util::nr_cpus().unwrap_or(64))
}

fn wakeup_bytes_for(ringbuf_bytes: u32, cpus: usize) -> u64 {
    (u64::from(ringbuf_bytes) / 4 / cpus.max(1) as u64).clamp(64 << 10, 1 << 20)
}

/// The event rings the CPUs write to (CPU `c` to ring `c % EVENT_RINGS`) and each one's
/// size: `ringbuf_bytes` shared out evenly, as a power of two of at least a page (the
/// kernel's rule).
fn event_rings(ringbuf_bytes: u32) -> (usize, u32) {
    event_rings_for(ringbuf_bytes, aya::util::nr_cpus().unwrap_or(EVENT_RINGS))
}

fn event_rings_for(ringbuf_bytes: u32, cpus: usize) -> (usize, u32) {
    let used = cpus.clamp(1, EVENT_RINGS);
    let share = ringbuf_bytes / used as u32;
    let size = share.checked_ilog2().map_or(0, |bit| 1 << bit);
    (used, size.max(PAGE_BYTES))
}

/// The smallest ring the kernel accepts (x86_64's page).
const PAGE_BYTES: u32 = 4096;

/// The embedded object with its globals set and its maps created; no program is loaded
/// yet.
struct Opened {
    ebpf: Ebpf,
    /// The kernel's struct offsets.
    offsets: KernelOffsets,
    /// The fork hook's field offset (without it the hook would read garbage, and is not
    /// attached).
    fork_child_pid: Option<u32>,
    /// How many event rings the CPUs write to ([`event_rings`]).
    rings_used: usize,
}

fn open_object(opts: &LoadOptions) -> Result<Opened, LoadError> {
    if !has_embedded_object() {
        return Err(LoadError::NoObject);
    }
    let offsets = kernel_offsets()?;
    let agent_tgid = std::process::id();
    let capture = opts.capture_bytes.min(MAX_CAPTURE as u32);
    let ebpf_debug = u32::from(tracing::enabled!(target: "tapir_ebpf", tracing::Level::DEBUG));
    let selective = opts.selection.is_selective();
    let fork_child_pid = tracefs::field_offset("sched", "sched_process_fork", "child_pid");
    let (rings_used, ring_bytes) = event_rings(opts.ringbuf_bytes);
    let mut loader = EbpfLoader::new();
    for (i, ring) in names::EVENT_RINGS.iter().enumerate() {
        // Rings no CPU writes to stay at a page.
        loader.map_max_entries(
            ring,
            if i < rings_used {
                ring_bytes
            } else {
                PAGE_BYTES
            },
        );
    }
    let ebpf = loader
        .override_global(names::OFFSETS, &offsets, true)
        .override_global(names::AGENT_TGID, &agent_tgid, true)
        .override_global(names::CAPTURE_BYTES, &capture, true)
        .override_global(names::WAKEUP_BYTES, &wakeup_bytes(opts.ringbuf_bytes), true)
        .override_global("TAPIR_INJ_LEARN", &u32::from(opts.inject_learn), true)
        .override_global("TAPIR_EBPF_DEBUG", &ebpf_debug, true)
        .override_global(names::SELECTIVE, &u32::from(selective), true)
        .override_global(
            "TAPIR_OPEN_PORTS_ON",
            &u32::from(!opts.selection.open_ports.is_empty()),
            true,
        )
        .override_global(
            "TAPIR_EXCLUDING",
            &u32::from(!opts.selection.excluded.is_empty()),
            true,
        )
        .override_global("TAPIR_FORK_CHILD_PID", &fork_child_pid.unwrap_or(0), true)
        .override_global(
            "TAPIR_EXEC_OLD_PID",
            &tracefs::field_offset("sched", "sched_process_exec", "old_pid").unwrap_or(0),
            true,
        )
        .override_global("TAPIR_SOCKOPS_PID", &u32::from(sockops_knows_pid()), true)
        .override_global("TAPIR_TLS_ON", &u32::from(opts.tls), true)
        .override_global(
            "TAPIR_EXEC_QUEUE",
            &u32::from(opts.selection.needs_rescan()),
            true,
        )
        .map_max_entries(names::CONNS, opts.max_connections)
        .load(Programs::for_this_kernel().object())
        .map_err(|e| LoadError::Load(Box::new(e)))?;
    Ok(Opened {
        ebpf,
        offsets,
        fork_child_pid,
        rings_used,
    })
}

/// Passes every program of the embedded object through this kernel's verifier (loads,
/// attaches nothing): what `tapir run` loads, so a kernel that refuses one is found
/// before a run. Returns how many loaded; the error names the first one refused.
pub fn verify_programs() -> Result<usize, String> {
    // With the switchable paths on: a switch frozen off lets the verifier skip what it
    // guards (here the listen program's body, with no --open-port).
    let opts = LoadOptions {
        selection: Selection {
            open_ports: vec![1],
            ..Selection::default()
        },
        ..LoadOptions::default()
    };
    let mut ebpf = open_object(&opts).map_err(|e| e.to_string())?.ebpf;
    let names = program_names();
    let refused = load_programs(&mut ebpf, &names);
    // The first refused in the probes' order, as a sequential load would have said.
    if let Some((name, e)) = names.iter().find_map(|n| refused.get(*n).map(|e| (n, e))) {
        return Err(format!("program {name} refused: {e}"));
    }
    Ok(names.len())
}

/// Loads the programs `names` of `ebpf` (the kernel verifies each as it is loaded), a few
/// at a time on as many threads as there are CPUs: the verifier runs in the loading
/// thread, and it is most of the agent's start-up (seconds on a small VM), during which
/// nothing is observed yet. Returns the errors, by program; a name missing from the
/// object is one. Attaching stays sequential, in the probes' order.
fn load_programs(ebpf: &mut Ebpf, names: &[&str]) -> std::collections::HashMap<String, String> {
    use aya::programs::Program;
    use std::sync::Mutex;
    let mut errors = std::collections::HashMap::new();
    let mut by_name: std::collections::HashMap<&str, &mut Program> = ebpf.programs_mut().collect();
    // In `names`' order (the probes', the heavy data programs early), popped from the end.
    let mut queue: Vec<(String, &mut Program)> = Vec::new();
    for name in names.iter().rev() {
        match by_name.remove(name) {
            Some(prog) => queue.push((name.to_string(), prog)),
            None => {
                errors.insert(name.to_string(), "missing from the eBPF object".to_string());
            }
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(queue.len().max(1));
    let queue = Mutex::new(queue);
    let refused = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let Some((name, prog)) = next else {
                    break;
                };
                let started = Instant::now();
                let refusal = |e: aya::programs::ProgramError| format!("{e:#}");
                let loaded = match &mut *prog {
                    Program::TracePoint(p) => p.load().map_err(refusal),
                    Program::SkMsg(p) => p.load().map_err(refusal),
                    Program::SockOps(p) => p.load().map_err(refusal),
                    Program::UProbe(p) => p.load().map_err(refusal),
                    other => Err(format!("unexpected program type {:?}", other.prog_type())),
                };
                // What start-up costs: the verifier's time and the instructions it walked
                // (paths through branches and loop steps, not the program's size).
                let walked = loaded
                    .as_ref()
                    .ok()
                    .and_then(|()| prog.info().ok()?.verified_instruction_count());
                tracing::debug!(
                    program = name.as_str(),
                    ms = started.elapsed().as_millis() as u64,
                    accepted = loaded.is_ok(),
                    walked,
                    "verifier"
                );
                if let Err(e) = loaded {
                    refused
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((name, e));
                }
            });
        }
    });
    errors.extend(refused.into_inner().unwrap_or_else(|e| e.into_inner()));
    errors
}

/// Program `name` of the object, as its type `P`.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, String>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| format!("program {name} is missing from the eBPF object"))?
        .try_into()
        .map_err(|e| format!("program {name}: {e}"))
}

pub fn load_and_attach(opts: &LoadOptions) -> Result<Attached, LoadError> {
    let tracefs = tracefs::ensure_mounted()?;
    let Opened {
        mut ebpf,
        offsets,
        fork_child_pid,
        rings_used,
    } = open_object(opts)?;
    let choosing = !opts.selection.is_everything();
    let seeded = if choosing {
        seed_selection(&mut ebpf, &opts.selection, None)?
    } else {
        Vec::new()
    };
    let mut names: Vec<&str> = unique_programs(PROBES);
    names.retain(|&p| p != "tapir_sched_fork" || fork_child_pid.is_some());
    if opts.inject {
        names.extend([SK_MSG_PROGRAM, SOCK_OPS_PROGRAM]);
    }
    if opts.tls {
        names.extend(tls_programs());
    }
    let refused = load_programs(&mut ebpf, &names);
    let mut failures = Vec::new();
    let mut links = Vec::new();
    for probe in PROBES {
        let attached = match (probe.program, fork_child_pid) {
            ("tapir_sched_fork", None) => Err("its format file has no child_pid field".to_string()),
            _ => match refused.get(probe.program) {
                Some(e) => Err(e.clone()),
                None => attach(&mut ebpf, probe),
            },
        };
        match attached {
            Ok(id) => links.push(LinkId::TracePoint(probe.program, id)),
            Err(error) if probe.required => {
                return Err(LoadError::RequiredProbe {
                    program: probe.program,
                    hook: hook_name(&probe.hook),
                    error,
                });
            }
            Err(error) => failures.push(ProbeFailure {
                probe: *probe,
                error,
            }),
        }
    }
    if choosing {
        // Processes started or forked while the probes were being attached.
        seed_selection(&mut ebpf, &opts.selection, Some(&seeded))?;
    }
    let injection = if opts.inject {
        match [SK_MSG_PROGRAM, SOCK_OPS_PROGRAM]
            .iter()
            .find_map(|p| refused.get(*p).map(|e| (p, e)))
        {
            Some((p, e)) => Err(format!("loading {p}: {e}")),
            None => attach_injection(&mut ebpf, &opts.inject_ports),
        }
    } else {
        Err("switched off".into())
    };
    let mut tls_seen = HashSet::new();
    let tls_refused = tls_programs().find_map(|p| refused.get(p).map(|e| (p, e)));
    let tls = if !opts.tls {
        Err("switched off (--no-tls)".into())
    } else if let Some((p, e)) = tls_refused {
        Err(format!("loading {p}: {e}"))
    } else {
        let libs = crate::tls_libs::find(&mut tls_seen);
        attach_tls(&mut ebpf, libs, &mut links)
    };
    Ok(Attached {
        ebpf,
        failures,
        tracefs,
        offsets,
        injection,
        selection: opts.selection.clone(),
        rings_used,
        links,
        tls,
        tls_seen,
        tls_wanted: opts.tls && tls_refused.is_none(),
    })
}

impl Attached {
    /// Whether the TLS probes are, or may later be, attached.
    pub fn tls_wanted(&self) -> bool {
        self.tls_wanted
    }
}

/// Probes the libssl files that appeared since start-up (a new container's own copy, a
/// process that loaded one from elsewhere). Returns those newly probed.
pub fn rescan_tls(attached: &mut Attached) -> Vec<std::path::PathBuf> {
    if !attached.tls_wanted() {
        return Vec::new();
    }
    let new = crate::tls_libs::find(&mut attached.tls_seen);
    if new.is_empty() {
        return Vec::new();
    }
    match attach_tls(&mut attached.ebpf, new, &mut attached.links) {
        Ok(probed) => {
            match &mut attached.tls {
                Ok(all) => all.extend(probed.iter().cloned()),
                Err(_) => attached.tls = Ok(probed.clone()),
            }
            probed
        }
        Err(_) => Vec::new(),
    }
}

/// The TLS programs: the entries, then the returns.
pub fn tls_programs() -> impl Iterator<Item = &'static str> {
    use crate::tls_libs::*;
    [
        SSL_ENTER_PROGRAM,
        SSL_ENTER_OUT5_PROGRAM,
        SSL_ENTER_RET_PROGRAM,
        SSL_READ_EXIT_PROGRAM,
        SSL_WRITE_EXIT_PROGRAM,
    ]
    .into_iter()
}

/// Uprobes on the entry and return of OpenSSL's internal read and write in each of `libs`
/// (at their `tls_libs::probe_points`), for every process (the programs check the selection). A
/// library whose code Tapir does not recognise is left alone (logged). Returns the
/// libraries probed; failing here only loses TLS, never capture.
fn attach_tls(
    ebpf: &mut Ebpf,
    libs: Vec<crate::tls_libs::Found>,
    links: &mut Vec<LinkId>,
) -> Result<Vec<std::path::PathBuf>, String> {
    use crate::tls_libs::*;
    use aya::programs::uprobe::{UProbeAttachLocation, UProbeScope};
    if libs.is_empty() {
        return Err("no libssl found on this host".into());
    }
    let mut probed = Vec::new();
    let mut errors = Vec::new();
    for Found { path: lib, points } in libs {
        let points = match points {
            Ok(p) => p,
            Err(e) => {
                errors.push(e.to_string());
                continue;
            }
        };
        if !points.cheap {
            tracing::warn!(
                "TLS probes in {}: OpenSSL's internal read/write start with an instruction \
                 the kernel single-steps; each SSL call will cost the process several µs \
                 more (much more on a VM)",
                lib.display()
            );
        }
        if points.read_count == SslCount::Returned {
            tracing::debug!(
                "{}: OpenSSL's internal read/write are inlined; probing SSL_read/SSL_write",
                lib.display()
            );
        }
        let mut attach = |name: &'static str, offset: u64| -> Result<(), String> {
            program::<UProbe>(ebpf, name)?
                .attach(
                    UProbeAttachLocation::AbsoluteOffset(offset),
                    &lib,
                    UProbeScope::AllProcesses,
                )
                .map(|id| links.push(LinkId::UProbe(name, id)))
                .map_err(|e| format!("{name} at {offset:#x} of {}: {e:#}", lib.display()))
        };
        // Returns first: an entry without its return would leave calls behind.
        let attached = attach(SSL_READ_EXIT_PROGRAM, points.read)
            .and_then(|()| attach(SSL_WRITE_EXIT_PROGRAM, points.write))
            .and_then(|()| attach(points.read_count.entry_program(), points.read))
            .and_then(|()| attach(points.write_count.entry_program(), points.write));
        match attached {
            Ok(()) => probed.push(lib),
            Err(e) => errors.push(e),
        }
    }
    for e in &errors {
        tracing::info!("TLS not read through {e}");
    }
    if probed.is_empty() {
        return Err(errors.join("; "));
    }
    Ok(probed)
}

/// sock_ops on the cgroup v2 root claims client sockets; sk_msg on their sockhash inserts
/// the header. Failing here only loses injection, never capture.
fn attach_injection(ebpf: &mut Ebpf, ports: &[u16]) -> Result<(), String> {
    use aya::{
        maps::{HashMap, SockHash},
        programs::{CgroupAttachMode, SkMsg, SockOps},
    };
    let root = crate::cgroup::host_cgroup_root()?;
    if !root.is_hierarchy_root {
        tracing::warn!("sock_ops attaches to {}", root.describe());
    }
    let root = root.path;
    {
        let map = ebpf
            .map_mut("TAPIR_INJ_PORTS")
            .ok_or("the eBPF object has no TAPIR_INJ_PORTS map")?;
        let mut known: HashMap<_, u16, u8> = HashMap::try_from(map).map_err(|e| e.to_string())?;
        for p in ports {
            known
                .insert(p, 1, 0)
                .map_err(|e| format!("port {p}: {e}"))?;
        }
    }
    let socks = ebpf
        .map("TAPIR_INJ_SOCKS")
        .ok_or("the eBPF object has no TAPIR_INJ_SOCKS map")?;
    let socks: SockHash<_, [u32; 12]> = SockHash::try_from(socks).map_err(|e| e.to_string())?;
    let socks_fd = socks.fd().try_clone().map_err(|e| e.to_string())?;
    let msg = program::<SkMsg>(ebpf, SK_MSG_PROGRAM)?;
    msg.attach(&socks_fd)
        .map_err(|e| format!("attaching sk_msg: {e}"))?;
    let cgroup = std::fs::File::open(&root).map_err(|e| format!("opening {root}: {e}"))?;
    let ops = program::<SockOps>(ebpf, SOCK_OPS_PROGRAM)?;
    ops.attach(&cgroup, CgroupAttachMode::Single)
        .map_err(|e| format!("attaching sock_ops to {root} (another agent attached?): {e}"))?;
    Ok(())
}

/// Puts the chosen and left-out processes running now into `TAPIR_SELECTED`, and the
/// names into `TAPIR_SELECT_NAMES` (the kernel follows fork, exec and exit from there);
/// returns the pids put in. `earlier`: what the pass before the probes were attached put
/// in. The probes are live now, so a process added late may have fds cached under the
/// old answer: its cache generation is bumped, as exec() would; and an earlier entry of a
/// process that exited before the exit hook was attached is removed (its pid could be
/// given to an unrelated process).
fn seed_selection(
    ebpf: &mut Ebpf,
    selection: &Selection,
    earlier: Option<&[u32]>,
) -> Result<Vec<u32>, LoadError> {
    let late = earlier.is_some();
    use aya::maps::{Array, HashMap};
    fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map, LoadError> {
        ebpf.map_mut(name)
            .ok_or_else(|| LoadError::Select(format!("the eBPF object has no {name} map")))
    }
    if !late {
        let mut names: HashMap<_, [u8; agent_common::select::COMM_LEN], u8> =
            HashMap::try_from(map(ebpf, names::SELECT_NAMES)?)
                .map_err(|e| select_err(names::SELECT_NAMES, e))?;
        for (key, why) in selection.comm_keys() {
            names
                .insert(key, why, 0)
                .map_err(|e| select_err(names::SELECT_NAMES, e))?;
        }
        if !selection.open_ports.is_empty() {
            let mut bits = [0u64; agent_common::select::OPEN_PORT_WORDS];
            for &p in &selection.open_ports {
                bits[usize::from(p) / 64] |= 1 << (p % 64);
            }
            let mut ports: Array<_, [u64; agent_common::select::OPEN_PORT_WORDS]> =
                Array::try_from(map(ebpf, names::OPEN_PORTS)?)
                    .map_err(|e| select_err(names::OPEN_PORTS, e))?;
            ports
                .set(0, bits, 0)
                .map_err(|e| select_err(names::OPEN_PORTS, e))?;
        }
    }
    let added = {
        let mut selected: HashMap<_, u32, u8> = HashMap::try_from(map(ebpf, names::SELECTED)?)
            .map_err(|e| select_err(names::SELECTED, e))?;
        let procs = scan_proc(std::path::Path::new("/proc"));
        if !late {
            let missing = selection.missing_pids(&procs);
            if !missing.is_empty()
                && missing.len() == selection.pids.len()
                && selection.names.is_empty()
                && selection.open_ports.is_empty()
            {
                return Err(LoadError::Select(format!(
                    "no process has the pid given with --pid ({}): nothing would be observed \
                     (give a process id from `ps -e`, on the host's pid namespace)",
                    missing
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            for pid in missing {
                tracing::warn!(
                    pid,
                    "--pid {pid}: no such process; nothing to observe for it"
                );
            }
        }
        for pid in earlier.unwrap_or_default() {
            if !procs.iter().any(|p| p.pid == *pid) {
                let _ = selected.remove(pid);
            }
        }
        let listening = if selection.open_ports.is_empty() {
            HashSet::new()
        } else {
            crate::listen::listening_pids(std::path::Path::new("/proc"), &selection.open_ports)
        };
        add_chosen(&mut selected, selection, &procs, &listening)?
    };
    if late && !added.is_empty() {
        let mut gens: HashMap<_, u32, u32> = HashMap::try_from(map(ebpf, names::PROC_GEN)?)
            .map_err(|e| select_err(names::PROC_GEN, e))?;
        bump_generations(&mut gens, &added)?;
        let mut epoch: Array<_, u64> = Array::try_from(map(ebpf, names::GEN_EPOCH)?)
            .map_err(|e| select_err(names::GEN_EPOCH, e))?;
        new_epoch(&mut epoch)?;
    }
    if !late {
        let left_out = added.iter().filter(|&&(_, why)| why == EXCLUDED).count();
        if selection.is_selective() {
            tracing::info!(
                processes = added.len() - left_out,
                "observing only the selected processes (--pid / --exe / --open-port) and what they fork"
            );
        }
        if !selection.excluded.is_empty() {
            tracing::info!(
                processes = left_out,
                "leaving out {} and what they fork (--exclude-exe)",
                selection.excluded.join(", ")
            );
        }
        let by_port = added.iter().filter(|&&(_, why)| why == BY_PORT).count();
        if !selection.open_ports.is_empty() {
            tracing::info!(
                processes = by_port,
                "observing processes that listen on --open-port {} (those that start listening \
                 later are picked up by the kernel at listen())",
                crate::listen::describe_ports(&selection.open_ports)
            );
        }
        if added.len() == left_out && (!selection.names.is_empty() || selection.needs_rescan()) {
            let given: Vec<&str> = (selection.names.iter().map(String::as_str))
                .chain(selection.patterns.iter().map(glob::Pattern::as_str))
                .collect();
            tracing::warn!(
                "no running process matches --exe {}: nothing is observed until one is started",
                given.join(" --exe ")
            );
        }
    } else if !added.is_empty() {
        tracing::debug!(
            processes = added.len(),
            "selected processes started during set-up"
        );
    }
    Ok(added.into_iter().map(|(pid, _)| pid).collect())
}

fn select_err(name: &str, e: aya::maps::MapError) -> LoadError {
    LoadError::Select(format!("{name}: {e}"))
}

/// Puts the processes among `procs` that `selection` chooses, and that the kernel has no
/// answer for yet, into `TAPIR_SELECTED`; returns them with why.
fn add_chosen<T: BorrowMut<MapData>>(
    selected: &mut aya::maps::HashMap<T, u32, u8>,
    selection: &Selection,
    procs: &[ProcEntry],
    listening: &HashSet<u32>,
) -> Result<Vec<(u32, u8)>, LoadError> {
    add_new(selected, selection.judge_listening(procs, listening))
}

/// Puts each of `chosen` (pid, why) that the kernel has no answer for yet into
/// `TAPIR_SELECTED`; returns those put in.
fn add_new<T: BorrowMut<MapData>>(
    selected: &mut aya::maps::HashMap<T, u32, u8>,
    chosen: impl IntoIterator<Item = (u32, u8)>,
) -> Result<Vec<(u32, u8)>, LoadError> {
    let mut added = Vec::new();
    for (pid, why) in chosen {
        if selected.get(&pid, 0).is_err() {
            selected
                .insert(pid, why, 0)
                .map_err(|e| select_err(names::SELECTED, e))?;
            added.push((pid, why));
        }
    }
    Ok(added)
}

/// Processes selected while the probes run may have fds cached under the old answer: their
/// generation is bumped, as exec() would.
fn bump_generations<T: BorrowMut<MapData>>(
    gens: &mut aya::maps::HashMap<T, u32, u32>,
    added: &[(u32, u8)],
) -> Result<(), LoadError> {
    for (pid, _) in added {
        let next = gens.get(pid, 0).unwrap_or(0).wrapping_add(1);
        gens.insert(pid, next, 0)
            .map_err(|e| select_err(names::PROC_GEN, e))?;
    }
    Ok(())
}

/// A new epoch makes every CPU re-read the generations (bump_gen on the eBPF side): the
/// clock ×4096 with a CPU number no CPU has, so no CPU ever cached it.
fn new_epoch<T: BorrowMut<MapData>>(epoch: &mut aya::maps::Array<T, u64>) -> Result<(), LoadError> {
    let now = crate::clock::monotonic_now_ns();
    epoch
        .set(0, now.wrapping_mul(4096) | 4095, 0)
        .map_err(|e| select_err(names::GEN_EPOCH, e))
}

/// Selects the processes started later that `--exe` patterns match: the kernel matches
/// exact names at exec and queues every exec for the patterns, which are matched here.
/// Holds its own handles on the selection maps.
pub struct SelectionRescan {
    selection: Selection,
    selected: aya::maps::HashMap<MapData, u32, u8>,
    gens: aya::maps::HashMap<MapData, u32, u32>,
    epoch: aya::maps::Array<MapData, u64>,
    execs: aya::maps::Queue<MapData, u32>,
    /// With `--open-port`: processes the kernel chose at listen().
    listeners: Option<aya::maps::Queue<MapData, u32>>,
    last_full_scan: Instant,
}

/// How often /proc is scanned whole, besides the processes the kernel queues at exec (in
/// case the queue overflowed).
const FULL_RESCAN_EVERY: Duration = Duration::from_secs(30);

impl SelectionRescan {
    /// `None` when the selection has no pattern and no `--open-port` (the kernel does all
    /// the work).
    pub fn take(attached: &mut Attached) -> Result<Option<Self>, LoadError> {
        let selection = &attached.selection;
        if !selection.needs_rescan() && !selection.follows_listeners() {
            return Ok(None);
        }
        let follows_listeners = selection.follows_listeners();
        let mut take = |name: &str| {
            attached
                .ebpf
                .take_map(name)
                .ok_or_else(|| LoadError::Select(format!("the eBPF object has no {name} map")))
        };
        let selected = take(names::SELECTED)?;
        let gens = take(names::PROC_GEN)?;
        let epoch = take(names::GEN_EPOCH)?;
        let execs = take(names::EXECS)?;
        let listeners = match follows_listeners {
            true => Some(
                aya::maps::Queue::try_from(take(names::LISTENERS)?)
                    .map_err(|e| select_err(names::LISTENERS, e))?,
            ),
            false => None,
        };
        Ok(Some(Self {
            selection: attached.selection.clone(),
            selected: aya::maps::HashMap::try_from(selected)
                .map_err(|e| select_err(names::SELECTED, e))?,
            gens: aya::maps::HashMap::try_from(gens).map_err(|e| select_err(names::PROC_GEN, e))?,
            epoch: aya::maps::Array::try_from(epoch)
                .map_err(|e| select_err(names::GEN_EPOCH, e))?,
            execs: aya::maps::Queue::try_from(execs).map_err(|e| select_err(names::EXECS, e))?,
            listeners,
            last_full_scan: Instant::now(),
        }))
    }

    /// Selects the matching processes the kernel does not know yet: the children of
    /// processes it chose at listen() (`--open-port`), and with `--exe` patterns those that
    /// exec'd since the last call (queued by the kernel) and every ~30 s all of /proc.
    pub fn rescan(&mut self) -> Result<Vec<u32>, LoadError> {
        let mut added = self.follow_listeners()?;
        if self.selection.needs_rescan() {
            added.extend(self.rescan_patterns()?);
        }
        Ok(added)
    }

    /// Children forked by a process before it listened on an `--open-port` port: Node's
    /// cluster workers, to which the primary hands the connections it accepts. The kernel
    /// chose the listener at listen() and queued it; its children inherit nothing from
    /// that, so they are chosen here (a child left out keeps its answer).
    fn follow_listeners(&mut self) -> Result<Vec<u32>, LoadError> {
        let Some(queue) = &mut self.listeners else {
            return Ok(Vec::new());
        };
        // Bounded: the queue's size, twice over.
        let listeners = drain(queue, 2048);
        if listeners.is_empty() {
            return Ok(Vec::new());
        }
        let procs = scan_proc(std::path::Path::new("/proc"));
        // Each listener's children, found once: chosen together, then logged per listener.
        let families: Vec<(u32, Vec<u32>)> = listeners
            .iter()
            .map(|&pid| (pid, children(&procs, &[pid])))
            .collect();
        let chosen = families
            .iter()
            .flat_map(|(_, kids)| kids.iter().map(|&pid| (pid, BY_PORT)));
        let added = add_new(&mut self.selected, chosen)?;
        self.invalidate(&added)?;
        for (pid, kids) in &families {
            tracing::info!(
                pid,
                program = program_of(&procs, *pid),
                children_added = added.iter().filter(|(c, _)| kids.contains(c)).count(),
                "observing a process that started listening on an --open-port port"
            );
        }
        Ok(added.into_iter().map(|(pid, _)| pid).collect())
    }

    /// Processes just put in may have fds cached under the old answer: their generations
    /// are bumped, and every CPU made to re-read them.
    fn invalidate(&mut self, added: &[(u32, u8)]) -> Result<(), LoadError> {
        if !added.is_empty() {
            bump_generations(&mut self.gens, added)?;
            new_epoch(&mut self.epoch)?;
        }
        Ok(())
    }

    fn rescan_patterns(&mut self) -> Result<Vec<u32>, LoadError> {
        // Bounded: the queue's size, twice over (exec keeps pushing meanwhile).
        let mut execd = drain(&mut self.execs, 8192);
        let procs = if self.last_full_scan.elapsed() >= FULL_RESCAN_EVERY {
            self.last_full_scan = Instant::now();
            scan_proc(std::path::Path::new("/proc"))
        } else {
            // A program exec'd is judged by itself: the rule that follows a renamed worker
            // to its master concerns forks, which the kernel follows.
            execd.sort_unstable();
            execd.dedup();
            execd.into_iter().filter_map(read_proc).collect()
        };
        if procs.is_empty() {
            return Ok(Vec::new());
        }
        let added = add_chosen(&mut self.selected, &self.selection, &procs, &HashSet::new())?;
        self.invalidate(&added)?;
        for (pid, _) in &added {
            tracing::info!(
                pid,
                program = program_of(&procs, *pid),
                "observing a process an --exe pattern matches"
            );
        }
        Ok(added.into_iter().map(|(pid, _)| pid).collect())
    }
}

/// Up to `max` pids from a queue the kernel fills.
fn drain(queue: &mut aya::maps::Queue<MapData, u32>, max: usize) -> Vec<u32> {
    (0..max).map_while(|_| queue.pop(0).ok()).collect()
}

/// What to call process `pid` in a log line: its executable's name, else its `comm`.
fn program_of(procs: &[ProcEntry], pid: u32) -> &str {
    procs
        .iter()
        .find(|p| p.pid == pid)
        .map_or("", |p| p.exe_name.as_deref().unwrap_or(&p.comm))
}

/// Whether sock_ops programs may call `bpf_get_current_pid_tgid` (Linux 6.10 and later):
/// only then can they tell which process connects.
pub(crate) fn sockops_knows_pid() -> bool {
    kernel_at_least(&crate::doctor::kernel_release(), (6, 10))
}

/// Whether a kernel release string ("6.18.44-fc-v669") is at least `(major, minor)`; an
/// unreadable one is not.
pub(crate) fn kernel_at_least(release: &str, want: (u32, u32)) -> bool {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next().and_then(|p| p.parse::<u32>().ok());
    let minor = parts.next().and_then(|p| p.parse::<u32>().ok());
    match (major, minor) {
        (Some(major), Some(minor)) => (major, minor) >= want,
        _ => false,
    }
}

fn attach(ebpf: &mut Ebpf, probe: &Probe) -> Result<TracePointLinkId, String> {
    match probe.hook {
        Hook::TracePoint(category, name) => {
            let tp = program::<TracePoint>(ebpf, probe.program)?;
            // Loaded beforehand, with the others, by `load_programs`.
            tp.attach(category, name).map_err(|e| format!("{e:#}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{event_rings_for, kernel_at_least, wakeup_bytes_for};
    use agent_common::EVENT_RINGS;

    #[test]
    fn kernel_release_comparison() {
        assert!(kernel_at_least("6.18.44-fc-v669\n", (6, 10)));
        assert!(kernel_at_least("6.10.0", (6, 10)));
        assert!(kernel_at_least("7.0.1", (6, 10)));
        assert!(!kernel_at_least("6.9.12-arch1", (6, 10)));
        assert!(!kernel_at_least("5.15.0-91-generic", (6, 10)));
        assert!(!kernel_at_least("", (6, 10)));
        assert!(!kernel_at_least("garbage", (6, 10)));
    }

    #[test]
    fn the_ring_bytes_are_shared_out_among_the_cpus_rings() {
        // The default 8 MiB on this 2-CPU host: two rings of 4 MiB.
        assert_eq!(event_rings_for(8 << 20, 2), (2, 4 << 20));
        // Not a power of two per ring: rounded down, never over the total.
        assert_eq!(event_rings_for(8 << 20, 3), (3, 2 << 20));
        assert_eq!(event_rings_for(8 << 20, 1), (1, 8 << 20));
        // More CPUs than rings: CPUs share the EVENT_RINGS rings.
        assert_eq!(event_rings_for(8 << 20, 96), (EVENT_RINGS, 512 << 10));
        // A tiny total or no CPU count: a page each, never zero rings.
        assert_eq!(event_rings_for(4096, 16), (16, 4096));
        assert_eq!(event_rings_for(0, 0), (1, 4096));
        assert_eq!(event_rings_for(u32::MAX, 1), (1, 1 << 31));
    }

    #[test]
    fn wakeup_budget_is_a_share_of_the_ring_within_bounds() {
        // The default 8 MiB ring on 2 CPUs: 1 MiB each, a quarter of the ring in all.
        assert_eq!(wakeup_bytes_for(8 << 20, 2), 1 << 20);
        assert_eq!(wakeup_bytes_for(8 << 20, 16), 128 << 10);
        // Many CPUs or a small ring: never below 64 KiB (wakeups stay rare)...
        assert_eq!(wakeup_bytes_for(8 << 20, 256), 64 << 10);
        assert_eq!(wakeup_bytes_for(256 << 10, 1), 64 << 10);
        // ... a large ring on few CPUs: never above 1 MiB (records reach us promptly).
        assert_eq!(wakeup_bytes_for(1 << 30, 1), 1 << 20);
        // No CPU count: no division by zero.
        assert_eq!(wakeup_bytes_for(8 << 20, 0), 1 << 20);
    }
}

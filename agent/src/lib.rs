//! Tapir: eBPF zero-code auto-instrumentation.
//!
//! Modules follow the data flow: kernel probes ([`probes`], [`loader`]) → ring buffer
//! records ([`capture`]) → per-connection HTTP/1.x assembly ([`http`]) → finished exchanges
//! ([`exchange`]) → outputs ([`watch`], [`otel`]).
pub mod assemble;
pub mod btf;
pub mod capture;
pub mod cgroup;
pub mod clock;
pub mod conn_table;
pub mod container;
pub mod doctor;
pub mod exchange;
pub mod heap;
pub mod http;
pub mod listen;
pub mod loader;
pub mod otel;
pub mod other_agents;
pub mod pipeline;
pub mod probes;
pub mod process;
pub mod program_stats;
pub mod rearm;
pub mod redis;
pub mod sched;
pub mod select;
pub mod self_usage;
pub mod stats;
#[cfg(test)]
mod test_alloc;
pub mod tls_libs;
pub mod tracefs;
pub mod unreadable;

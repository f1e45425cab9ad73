//! HTTP/1.x assembly: turns the syscall chunks of one TCP connection into request/response
//! [`Exchange`]s.
//!
//! The kernel captures only a prefix of each syscall's payload (plus its last few bytes), so
//! the parsers here follow message framing from byte counts where the bytes themselves are
//! missing, and drop (and count, see [`DropReason`]) what they cannot make sense of rather
//! than guess.
//!
//! - [`chunk`]: what the kernel reports per syscall ([`Chunk`]).
//! - [`head`]: request/response heads → the few fields Tapir keeps.
//! - [`chunked`]: framing of the chunked transfer coding.
//! - [`cursor`]: a read position over one syscall's partly captured bytes.
//! - [`stream`]: the per-connection state machine ([`Http1Stream`]).
//! - [`exchange`], [`stats`]: what comes out.

pub mod chunk;
pub mod chunked;
pub mod cursor;
pub mod exchange;
pub mod head;
pub mod stats;
pub mod stream;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use chunk::{Chunk, Direction};
pub use exchange::{Exchange, ExchangeRole, HttpVersion};
pub use stats::{DropReason, StreamStats};
pub use stream::{Http1Stream, StreamConfig, StreamError};

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
//! - [`stream`]: the per-connection state machine ([`Http1Stream`]); `pairing` keeps its
//!   requests in line for their responses.
//! - [`h2`]: the same for HTTP/2 connections ([`Http2Stream`]).
//! - [`exchange`], [`stats`]: what comes out.
//!
//! Approximations, by design:
//! - A message may only start where the previous one ended, or at the start of a chunk
//!   when out of sync (first chunks of a connection, after a drop).
//! - Once chunked framing falls into uncaptured bytes, a body ends at a syscall whose last
//!   bytes are `0\r\n\r\n` (trailers then hide the end until the next message or close),
//!   and its byte count includes framing.
//! - A head cut by the capture keeps only its captured fields; its end is taken from the
//!   syscall's tail when that is unambiguous.

pub mod chunk;
pub mod chunked;
pub mod cursor;
pub mod exchange;
pub mod h2;
pub mod head;
mod pairing;
pub mod stats;
pub mod stream;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use chunk::{Chunk, Direction};
pub use exchange::{Exchange, ExchangeRole, Failure, GrpcCall, HttpVersion};
pub use h2::{Http2Stream, WalkStart};
pub use stats::{DropReason, StreamStats};
pub use stream::{Http1Stream, StreamConfig, StreamError};

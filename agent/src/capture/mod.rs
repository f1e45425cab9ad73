//! Kernel → userspace: reading the event rings in place, merging them into one order, and
//! decoding their records.
pub mod events;
pub mod merge;
pub mod reader;
pub mod ring;
pub mod yielding;

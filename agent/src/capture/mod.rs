//! Kernel → userspace: decoding ring-buffer records and draining the ring buffer.
pub mod events;
pub mod reader;

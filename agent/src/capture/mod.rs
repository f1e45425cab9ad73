//! Kernel → userspace: decoding ring-buffer records, draining the rings and merging them.
pub mod events;
pub mod merge;
pub mod reader;

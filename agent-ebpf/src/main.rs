//! Tapir's kernel programs: syscall tracepoints that find TCP connections and copy a bounded
//! prefix of the bytes that look like HTTP/1.x into one ring buffer. All parsing happens in
//! userspace (see `agent/src/http`).
#![no_std]
#![no_main]

mod conn;
mod data;
mod h2;
mod inject;
mod lifecycle;
mod looping;
mod maps;
mod sock;
mod tls;
mod trace;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

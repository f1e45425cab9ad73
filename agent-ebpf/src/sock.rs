//! fd → `struct sock` → TCP 4-tuple, walking task → files → fdtable → file → socket with
//! offsets from the running kernel's BTF (no CO-RE, no kernel headers).
use agent_common::{AF_INET, AF_INET6};
use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_kernel_buf};

use crate::maps::{kernel_offset, CONN_SCRATCH};

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const SOCK_STREAM: i16 = 1;
const IPPROTO_TCP: u16 = 6;
/// Go 1.24+ listens on MPTCP sockets where the kernel allows it; a plain TCP client's
/// connection is then accepted as a plain TCP socket.
const IPPROTO_MPTCP: u16 = 262;

pub enum FdKind {
    /// A TCP socket; its 4-tuple is in this CPU's `CONN_SCRATCH` event.
    Tcp {
        sock_id: u64,
        local_port: u16,
        remote_port: u16,
    },
    Other,
    /// Kernel memory could not be read; say nothing about this fd.
    Unknown,
}

#[inline(always)]
unsafe fn read<T>(base: u64, off: u32) -> Result<T, i32> {
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }
}

/// Classifies `fd` of the current process.
#[inline(always)]
pub fn resolve_fd(fd: u32) -> FdKind {
    match unsafe { try_resolve(fd) } {
        Ok(k) => k,
        Err(_) => FdKind::Unknown,
    }
}

/// The local port of `fd` of the current process when it is a TCP or MPTCP socket (an
/// MPTCP listener's port is its first subflow's, copied at bind()).
#[inline(always)]
pub fn stream_local_port(fd: u32) -> Option<u16> {
    let (sk, _) = unsafe { stream_sock(fd) }.ok().flatten()?;
    let protocol = unsafe { sock_protocol(sk) }.ok()?;
    if protocol != IPPROTO_TCP && protocol != IPPROTO_MPTCP {
        return None;
    }
    unsafe { read(sk, kernel_offset!(skc_num)) }.ok()
}

/// `struct sock` of `fd`, and its family, when it is an AF_INET/AF_INET6 stream socket.
#[inline(always)]
unsafe fn stream_sock(fd: u32) -> Result<Option<(u64, u16)>, i32> {
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = unsafe { read(task, kernel_offset!(task_files))? };
    if files == 0 {
        return Err(-1);
    }
    let fdt: u64 = unsafe { read(files, kernel_offset!(files_fdt))? };
    let max_fds: u32 = unsafe { read(fdt, kernel_offset!(fdtable_max_fds))? };
    if fd >= max_fds {
        return Ok(None);
    }
    let fd_array: u64 = unsafe { read(fdt, kernel_offset!(fdtable_fd))? };
    let file: u64 = unsafe { read(fd_array, fd * 8)? };
    if file == 0 {
        return Ok(None);
    }
    let inode: u64 = unsafe { read(file, kernel_offset!(file_f_inode))? };
    let mode: u16 = unsafe { read(inode, kernel_offset!(inode_i_mode))? };
    if mode & S_IFMT != S_IFSOCK {
        return Ok(None);
    }
    let socket: u64 = unsafe { read(file, kernel_offset!(file_private_data))? };
    let stype: i16 = unsafe { read(socket, kernel_offset!(socket_type))? };
    if stype != SOCK_STREAM {
        return Ok(None);
    }
    let sk: u64 = unsafe { read(socket, kernel_offset!(socket_sk))? };
    if sk == 0 {
        return Ok(None);
    }
    let family: u16 = unsafe { read(sk, kernel_offset!(skc_family))? };
    if family != AF_INET && family != AF_INET6 {
        return Ok(None);
    }
    Ok(Some((sk, family)))
}

#[inline(always)]
unsafe fn sock_protocol(sk: u64) -> Result<u16, i32> {
    if kernel_offset!(sock_protocol_size) == 1 {
        Ok(unsafe { read::<u8>(sk, kernel_offset!(sock_protocol))? } as u16)
    } else {
        unsafe { read(sk, kernel_offset!(sock_protocol)) }
    }
}

unsafe fn try_resolve(fd: u32) -> Result<FdKind, i32> {
    let Some((sk, family)) = (unsafe { stream_sock(fd)? }) else {
        return Ok(FdKind::Other);
    };
    if unsafe { sock_protocol(sk)? } != IPPROTO_TCP {
        return Ok(FdKind::Other);
    }
    let local_port: u16 = unsafe { read(sk, kernel_offset!(skc_num))? };
    let remote_port = u16::from_be(unsafe { read(sk, kernel_offset!(skc_dport))? });
    let ev = CONN_SCRATCH.get_ptr_mut(0).ok_or(-1)?;
    // SAFETY: this CPU's slot; nothing else on this CPU uses it during this program.
    let t = unsafe { &mut (*ev).tuple };
    t.family = family;
    t.local_port = local_port;
    t.remote_port = remote_port;
    if family == AF_INET {
        clear_addr(&mut t.local_addr);
        clear_addr(&mut t.remote_addr);
        let l: u32 = unsafe { read(sk, kernel_offset!(skc_rcv_saddr))? };
        let r: u32 = unsafe { read(sk, kernel_offset!(skc_daddr))? };
        // SAFETY: the address arrays are 8-aligned in the map value (ConnTuple layout).
        unsafe {
            core::ptr::write_volatile(t.local_addr.as_mut_ptr() as *mut u32, l);
            core::ptr::write_volatile(t.remote_addr.as_mut_ptr() as *mut u32, r);
        }
    } else {
        let base = sk as *const u8;
        // Straight into map memory: no 16-byte copies on the stack.
        unsafe {
            bpf_probe_read_kernel_buf(
                base.wrapping_add(kernel_offset!(skc_v6_rcv_saddr) as usize),
                &mut t.local_addr,
            )?;
            bpf_probe_read_kernel_buf(
                base.wrapping_add(kernel_offset!(skc_v6_daddr) as usize),
                &mut t.remote_addr,
            )?;
        }
    }
    Ok(FdKind::Tcp {
        sock_id: sk,
        local_port,
        remote_port,
    })
}

/// Zeroes an address in two 8-byte stores (a plain assignment becomes a memset call).
#[inline(always)]
pub fn clear_addr(a: &mut [u8; 16]) {
    let w = a.as_mut_ptr() as *mut u64;
    // SAFETY: 16 bytes, 8-aligned in the map value (ConnTuple layout).
    unsafe {
        core::ptr::write_volatile(w, 0);
        core::ptr::write_volatile(w.add(1), 0);
    }
}

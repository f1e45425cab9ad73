//! fd → `struct sock` → TCP 4-tuple, walking task → files → fdtable → file → socket with
//! offsets from the running kernel's BTF (no CO-RE, no kernel headers).
use agent_common::{ConnTuple, AF_INET, AF_INET6};
use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};

use crate::maps::offsets;

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const SOCK_STREAM: i16 = 1;
const IPPROTO_TCP: u16 = 6;

pub enum FdKind {
    Tcp {
        sock_id: u64,
        tuple: ConnTuple,
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

unsafe fn try_resolve(fd: u32) -> Result<FdKind, i32> {
    let o = offsets();
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = unsafe { read(task, o.task_files)? };
    if files == 0 {
        return Ok(FdKind::Unknown);
    }
    let fdt: u64 = unsafe { read(files, o.files_fdt)? };
    let max_fds: u32 = unsafe { read(fdt, o.fdtable_max_fds)? };
    if fd >= max_fds {
        return Ok(FdKind::Other);
    }
    let fd_array: u64 = unsafe { read(fdt, o.fdtable_fd)? };
    let file: u64 = unsafe { read(fd_array, fd * 8)? };
    if file == 0 {
        return Ok(FdKind::Other);
    }
    let inode: u64 = unsafe { read(file, o.file_f_inode)? };
    let mode: u16 = unsafe { read(inode, o.inode_i_mode)? };
    if mode & S_IFMT != S_IFSOCK {
        return Ok(FdKind::Other);
    }
    let socket: u64 = unsafe { read(file, o.file_private_data)? };
    let stype: i16 = unsafe { read(socket, o.socket_type)? };
    if stype != SOCK_STREAM {
        return Ok(FdKind::Other);
    }
    let sk: u64 = unsafe { read(socket, o.socket_sk)? };
    if sk == 0 {
        return Ok(FdKind::Other);
    }
    let family: u16 = unsafe { read(sk, o.skc_family)? };
    if family != AF_INET && family != AF_INET6 {
        return Ok(FdKind::Other);
    }
    let protocol: u16 = if o.sock_protocol_size == 1 {
        unsafe { read::<u8>(sk, o.sock_protocol)? as u16 }
    } else {
        unsafe { read(sk, o.sock_protocol)? }
    };
    if protocol != IPPROTO_TCP {
        return Ok(FdKind::Other);
    }
    let mut tuple = ConnTuple {
        family,
        ..ConnTuple::default()
    };
    tuple.local_port = unsafe { read(sk, o.skc_num)? };
    let dport: u16 = unsafe { read(sk, o.skc_dport)? };
    tuple.remote_port = u16::from_be(dport);
    if family == AF_INET {
        let l: [u8; 4] = unsafe { read(sk, o.skc_rcv_saddr)? };
        let r: [u8; 4] = unsafe { read(sk, o.skc_daddr)? };
        tuple.local_addr[..4].copy_from_slice(&l);
        tuple.remote_addr[..4].copy_from_slice(&r);
    } else {
        tuple.local_addr = unsafe { read(sk, o.skc_v6_rcv_saddr)? };
        tuple.remote_addr = unsafe { read(sk, o.skc_v6_daddr)? };
    }
    Ok(FdKind::Tcp { sock_id: sk, tuple })
}

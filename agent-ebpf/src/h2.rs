//! HTTP/2 framing, followed in the kernel so that a call larger than the capture still
//! shows every frame header and header block it moved. A large response body and its
//! trailers written at once (grpcio), or a read that takes in several frames, would
//! otherwise leave header blocks beyond the copy, and the agent, whose HPACK table must see
//! every block, would have to give the connection up.
//!
//! Per connection and direction the kernel keeps where the next frame header starts
//! ([`H2Framing`]). A call within the capture is copied whole, as before, and only scanned
//! to move that position on. A larger call is walked frame by frame and copied without its
//! DATA payloads: the record ([`DATA_H2_SPARSE`]) holds the call's bytes minus every DATA
//! payload byte, and says where the walk started, so the agent can check that kernel and
//! parser agree before it reads the record.
//!
//! Not in the compat build (kernels before 5.17): 5.10's verifier took ~95 s per data
//! program with the walk in them (under emulation; 4 s without). There, every HTTP/2 call
//! is copied up to the capture, as before.
#![cfg_attr(feature = "compat", allow(dead_code))]
use agent_common::{DIR_EGRESS, DIR_INGRESS, MAX_CAPTURE, MAX_IOVECS};
use aya_ebpf::{macros::map, maps::LruHashMap};

#[cfg(not(feature = "compat"))]
use crate::looping::repeat;
use crate::{
    data::copy_user,
    maps::{DataScratch, SCRATCH, SCRATCH_BYTES},
    trace::byte_at,
};

/// Bytes of a frame header: length (24 bits), type, flags, stream id.
const FRAME_HEADER: u8 = 9;
/// The client connection preface, `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`: walked as a frame
/// payload that is kept.
const PREFACE_LEN: u32 = 24;
/// Frame type 0: its payload is body, never copied from a large call.
const DATA: u8 = 0;

/// Pieces of one walk, one per `bpf_loop` step: a piece reads (part of) one frame header,
/// passes (part of) one payload, or moves to the next iovec; about 128 frames. Walks that
/// need more are left incomplete (the agent then gives the connection up, as it does
/// without the walk). Only calls larger than the capture are walked (the others are
/// scanned, [`scan_frames`]); more pieces per step cost start-up more than they saved (the
/// verifier walks each step's every path: 8 per step doubled the data programs' count).
const WALK_STEPS: u32 = 256;

/// Where one direction of an HTTP/2 connection stands between calls.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct H2Framing {
    /// Payload bytes of the current frame still to come (0: a frame header is next).
    pub left: u32,
    /// The current header's first bytes (length and type) while it is read.
    pub head: [u8; 4],
    /// Header bytes read so far (0 to 8).
    pub have: u8,
    /// Non-zero when the current frame is DATA.
    pub data: u8,
    /// Non-zero once the position is unknown (a call the walk could not follow).
    pub lost: u8,
    pub _pad: u8,
}

/// Both directions, indexed by `DIR_INGRESS`/`DIR_EGRESS`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct H2Conn {
    pub dirs: [H2Framing; 2],
}

/// sock_id → framing of HTTP/2 connections. An entry is made when a connection is found
/// to speak HTTP/2, or (a connection whose entry was evicted, or a TLS one whose first
/// write was held) at its next call, at a frame boundary: the agent checks that guess.
#[map(name = "TAPIR_H2_FRAMES")]
pub static H2_FRAMES: LruHashMap<u64, H2Conn> = LruHashMap::with_max_entries(16384, 0);

/// A walk's inputs and running state, in the per-CPU scratch record.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct H2Walk {
    /// Bytes the call moved; of them, accounted for so far.
    pub total: u64,
    pub pos: u64,
    /// Bytes kept in `scratch.data`, and the most it may hold.
    pub out: u64,
    pub cap: u64,
    /// Copying from user memory (a large call), or scanning what `scratch.data` holds.
    pub copy: u64,
    /// The iovec holding `pos`, where it starts in the call, iovecs read.
    pub iov: u64,
    pub seg_start: u64,
    pub read: u64,
    pub f: H2Framing,
}

/// A connection just found to speak HTTP/2: both directions at a frame boundary, but the
/// one that carries the client preface (`preface_dir`).
#[inline(always)]
pub fn start(sock_id: u64, preface_dir: u8) {
    if cfg!(feature = "compat") {
        return;
    }
    let mut fresh = H2Conn::default();
    // Constant indexes: 5.10's verifier refuses a write to the stack at a variable offset.
    if preface_dir == DIR_INGRESS {
        fresh.dirs[DIR_INGRESS as usize].left = PREFACE_LEN;
    } else {
        fresh.dirs[DIR_EGRESS as usize].left = PREFACE_LEN;
    }
    let _ = H2_FRAMES.insert(&sock_id, &fresh, 0);
}

/// The connection's framing, made (at a frame boundary, which the agent checks) if missing.
#[inline(always)]
pub fn framing(sock_id: u64) -> Option<*mut H2Conn> {
    if cfg!(feature = "compat") {
        return None;
    }
    if let Some(c) = H2_FRAMES.get_ptr_mut(&sock_id) {
        return Some(c);
    }
    H2_FRAMES.insert(&sock_id, &H2Conn::default(), 0).ok()?;
    H2_FRAMES.get_ptr_mut(&sock_id)
}

/// Copies an HTTP/2 call into `scratch.data` and moves the direction's framing on: whole
/// up to `want` bytes, or (a larger call, framing known) walked and copied without DATA
/// payloads. Returns the bytes copied, and whether the record is such a sparse one (its
/// header's `tail` then holds the framing the walk started from).
#[inline(always)]
pub fn copy_call(
    scratch: &mut DataScratch,
    conn: Option<*mut H2Conn>,
    direction: u8,
    buf: Option<u64>,
    total: u64,
    want: u64,
    copy_whole: impl FnOnce(&mut DataScratch) -> u64,
) -> (u64, bool) {
    let Some(conn) = conn else {
        return (copy_whole(scratch), false);
    };
    // SAFETY: pointer from a successful map lookup; the index is masked to the array.
    let f = unsafe { &mut (*conn).dirs[(direction & 1) as usize] };
    if f.lost != 0 {
        return (copy_whole(scratch), false);
    }
    let sparse = total > want;
    let read = if sparse {
        match buf {
            Some(addr) => {
                scratch.iovecs[0] = [addr, total];
                1
            }
            None => scratch.gather.read,
        }
    } else {
        let copied = copy_whole(scratch);
        if copied < total {
            f.lost = 1;
            return (copied, false);
        }
        0
    };
    let start = *f;
    // A call copied whole is first scanned here, a frame per turn of a short loop: most
    // calls end within it (a step of `bpf_loop` costs a call and a return).
    let mut pos = 0;
    let mut at = start;
    if !sparse {
        (pos, at) = scan_frames(&scratch.data, total, start);
        if pos >= total {
            *f = at;
            return (total, false);
        }
    }
    // Field by field: a struct assignment with zeroed fields becomes a byte-by-byte memset.
    let w = &mut scratch.h2;
    w.total = total;
    w.pos = pos;
    w.out = pos;
    w.cap = want;
    w.copy = sparse as u64;
    w.iov = 0;
    w.seg_start = 0;
    w.read = read;
    w.f = at;
    walk();
    let w = &scratch.h2;
    *f = w.f;
    if w.pos < total {
        f.lost = 1;
    }
    let out = w.out;
    if !sparse {
        return (total, false);
    }
    let hdr = &mut scratch.hdr;
    let left = start.left.to_le_bytes();
    hdr.tail[..4].copy_from_slice(&left);
    hdr.tail[4] = start.have;
    hdr.tail[5] = start.data;
    hdr.tail_len = 6;
    (out, true)
}

/// Frames a scan passes in its short loop; a call with more goes on in the walk.
const SCAN_FRAMES: u32 = 16;

/// Moves `f` over the whole frames of a call held in `data` (`total` bytes): returns how far
/// it got (`total` when done) and the framing there. Stops early at a frame header split
/// across calls, or after [`SCAN_FRAMES`] frames, where the walk takes over.
#[inline(always)]
fn scan_frames(data: &[u8; SCRATCH_BYTES], total: u64, f: H2Framing) -> (u64, H2Framing) {
    let mut f = f;
    if f.have != 0 {
        return (0, f);
    }
    let mut pos = (f.left as u64).min(total);
    f.left -= pos as u32;
    let mut i = 0;
    while i < SCAN_FRAMES && f.left == 0 && pos + FRAME_HEADER as u64 <= total {
        // Through `black_box`, so that LLVM keeps `byte_at`'s masks (6.1's verifier needs
        // them; it cannot bound `pos` by `total`).
        let p = core::hint::black_box(pos);
        let len = (byte_at(data, p) as u64) << 16
            | (byte_at(data, p + 1) as u64) << 8
            | byte_at(data, p + 2) as u64;
        f.data = (byte_at(data, p + 3) == DATA) as u8;
        let end = pos + FRAME_HEADER as u64 + len;
        if end > total {
            f.left = (end - total) as u32;
            pos = total;
        } else {
            pos = end;
        }
        i += 1;
    }
    (pos, f)
}

/// Runs the walk set up in `scratch.h2`.
#[cfg(not(feature = "compat"))]
#[inline(always)]
fn walk() {
    repeat!(tapir_compat_h2_walk, walk_step, 0, WALK_STEPS, 0);
}
#[cfg(feature = "compat")]
fn walk() {}

/// One step of a walk (see [`H2Walk`]): one piece, on the state in place (a copy on the
/// stack put the read programs' call chain over the 512 bytes of stack).
extern "C" fn walk_step(_i: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch filled by the caller on this CPU.
    let DataScratch {
        data,
        iovecs,
        h2: w,
        ..
    } = unsafe { &mut *scratch };
    if piece(w, data, iovecs) && w.pos < w.total {
        0
    } else {
        1
    }
}

/// One piece of a walk: (a part of) a frame header, (a part of) a payload, or a move to the
/// next iovec. False when the walk stops.
#[inline(always)]
fn piece(w: &mut H2Walk, data: &mut [u8; SCRATCH_BYTES], iovecs: &[[u64; 2]; MAX_IOVECS]) -> bool {
    if w.pos >= w.total {
        return false;
    }
    let mut src = 0;
    let mut avail = w.total - w.pos;
    let skip = w.f.left > 0 && w.f.data != 0;
    if w.copy != 0 && !skip {
        // Bytes to keep: find them in the call's buffers.
        if w.iov >= w.read {
            return false;
        }
        // Masked after `black_box`: LLVM would drop a mask it can prove redundant, and the
        // verifier (5.10's) does not keep the bound of a value reloaded from the stack.
        let i = core::hint::black_box(w.iov) & (MAX_IOVECS as u64 - 1);
        let [base, len] = iovecs[i as usize];
        let end = w.seg_start + len;
        if w.pos >= end {
            w.iov += 1;
            w.seg_start = end;
            return true;
        }
        src = base + (w.pos - w.seg_start);
        avail = avail.min(end - w.pos);
    }
    if w.f.left > 0 {
        let n = avail.min(w.f.left as u64);
        if w.copy == 0 {
            w.out += n;
        } else if !skip {
            if w.out + n > w.cap || copy_user(data, w.out, src, n) != n {
                return false;
            }
            w.out += n;
        }
        w.pos += n;
        w.f.left -= n as u32;
        return true;
    }
    let have = w.f.have as u64;
    let n = avail.min(FRAME_HEADER as u64 - have);
    if w.copy != 0 && (w.out + n > w.cap || copy_user(data, w.out, src, n) != n) {
        return false;
    }
    // The header's bytes `have..have + n` are now at `out`: keep its length and type. One
    // line per byte, so that each index is a constant (5.10's verifier refuses a write to
    // the stack at a variable offset).
    let out = w.out;
    let at = |k: u64| byte_at(data, out + k - have);
    let end = have + n;
    if have == 0 && end > 0 {
        w.f.head[0] = at(0);
    }
    if have <= 1 && end > 1 {
        w.f.head[1] = at(1);
    }
    if have <= 2 && end > 2 {
        w.f.head[2] = at(2);
    }
    if have <= 3 && end > 3 {
        w.f.head[3] = at(3);
    }
    w.out += n;
    w.pos += n;
    w.f.have += n as u8;
    if w.f.have >= FRAME_HEADER {
        let h = w.f.head;
        w.f.left = u32::from_be_bytes([0, h[0], h[1], h[2]]);
        w.f.data = (h[3] == DATA) as u8;
        w.f.have = 0;
    }
    true
}

const _: () = assert!(MAX_CAPTURE.is_power_of_two());

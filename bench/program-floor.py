#!/usr/bin/env python3
"""What a busy server pays for eBPF programs on its syscalls before they do anything.

Attaches a program to the exit tracepoints of the syscalls nginx makes per keep-alive
request (`recvfrom`, `writev`), as Tapir does, and holds it until stdin closes or SIGINT:

  empty      `r0 = 0; exit`: the tracepoint's own cost of calling a program
  calls N    N calls of bpf_get_current_pid_tgid first (the cheapest helper): what one
             call and return costs on this CPU (its mitigations make every return dear)
  regs       finds the syscall's buffer argument (bpf_task_pt_regs), as Tapir does
  ktime      … and reads the clock (bpf_ktime_get_ns)
  stack N    … and copies N bytes of it with bpf_probe_read_user onto the BPF stack
  lookup     … and looks up a per-CPU array map value (Tapir's scratch space)
  map N      … and copies N bytes of the buffer into that map value
  raw        an empty raw tracepoint program on `sys_exit`, which every syscall calls
             (--syscalls does not apply)

`bench/tracepoint-floor.sh` times `dd` with each of these attached. Context for
BENCHMARKS.md (sessions 15 and 24), not part of `cargo xtask bench`. Needs root.
Usage: bench/program-floor.py KIND [N] [--syscalls recvfrom,writev]
"""
import argparse
import ctypes
import os
import signal
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)
NR_BPF, NR_PERF_EVENT_OPEN = 321, 298  # x86_64
BPF_PROG_LOAD, BPF_RAW_TRACEPOINT_OPEN = 5, 17
BPF_PROG_TYPE_TRACEPOINT, BPF_PROG_TYPE_RAW_TRACEPOINT = 5, 17
PERF_TYPE_TRACEPOINT = 2
PERF_EVENT_IOC_ENABLE, PERF_EVENT_IOC_SET_BPF = 0x2400, 0x40042408
HELPER_GET_CURRENT_PID_TGID = 14


def insn(code, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


HELPER_MAP_LOOKUP, HELPER_KTIME_GET_NS, HELPER_PROBE_READ_USER = 1, 5, 112
HELPER_GET_CURRENT_TASK_BTF, HELPER_TASK_PT_REGS = 158, 175
BPF_MAP_CREATE, BPF_MAP_TYPE_PERCPU_ARRAY = 0, 6
EXIT = insn(0xB7) + insn(0x95)  # r0 = 0; exit


def program(calls):
    body = b"".join(insn(0x85, imm=HELPER_GET_CURRENT_PID_TGID) for _ in range(calls))
    return body + EXIT


def map_create(value_size):
    attr = ctypes.create_string_buffer(struct.pack("<IIIII", BPF_MAP_TYPE_PERCPU_ARRAY, 4,
                                                   value_size, 1, 0), 128)
    fd = libc.syscall(NR_BPF, BPF_MAP_CREATE, attr, 128)
    if fd < 0:
        sys.exit(f"BPF_MAP_CREATE: {os.strerror(ctypes.get_errno())}")
    return fd


def copy_program(kind, n, map_fd):
    """r9 = the syscall's second argument (the buffer; pt_regs.si at 104), then the kind's
    work. x86_64 only, as Tapir's own programs."""
    code = insn(0x85, imm=HELPER_GET_CURRENT_TASK_BTF)
    code += insn(0xBF, dst=1, src=0)                      # r1 = r0
    code += insn(0x85, imm=HELPER_TASK_PT_REGS)
    code += insn(0x79, dst=9, src=0, off=104)             # r9 = regs->si
    if kind == "ktime":
        code += insn(0x85, imm=HELPER_KTIME_GET_NS)
    elif kind == "stack":
        code += insn(0xBF, dst=1, src=10) + insn(0x07, dst=1, imm=-n)  # r1 = fp - n
        code += insn(0xB7, dst=2, imm=n) + insn(0xBF, dst=3, src=9)
        code += insn(0x85, imm=HELPER_PROBE_READ_USER)
    elif kind in ("lookup", "map"):
        code += insn(0x62, dst=10, off=-4, imm=0)         # *(u32 *)(fp - 4) = 0
        code += insn(0x18, dst=1, src=1, imm=map_fd) + insn(0)  # r1 = map (ld_imm64)
        code += insn(0xBF, dst=2, src=10) + insn(0x07, dst=2, imm=-4)
        code += insn(0x85, imm=HELPER_MAP_LOOKUP)
        if kind == "map":
            code += insn(0x15, dst=0, off=4)              # if r0 == 0 goto exit
            code += insn(0xBF, dst=1, src=0)
            code += insn(0xB7, dst=2, imm=n) + insn(0xBF, dst=3, src=9)
            code += insn(0x85, imm=HELPER_PROBE_READ_USER)
    return code + EXIT


def load(code, prog_type=BPF_PROG_TYPE_TRACEPOINT):
    insns = ctypes.create_string_buffer(code, len(code))
    license = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(1 << 16)
    attr = struct.pack("<IIQQIIQ", prog_type, len(code) // 8,
                       ctypes.addressof(insns), ctypes.addressof(license),
                       1, len(log), ctypes.addressof(log))
    buf = ctypes.create_string_buffer(attr, 128)
    fd = libc.syscall(NR_BPF, BPF_PROG_LOAD, buf, 128)
    if fd < 0:
        sys.exit(f"BPF_PROG_LOAD: {os.strerror(ctypes.get_errno())}\n{log.value.decode()}")
    return fd


def tracepoint_id(name):
    for root in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"):
        path = f"{root}/events/syscalls/{name}/id"
        if os.path.exists(path):
            return int(open(path).read())
    sys.exit(f"no tracepoint {name}: is tracefs mounted?")


def attach(prog_fd, name):
    # struct perf_event_attr: type, size, config, sample_period, ... (128 bytes zeroed).
    attr = ctypes.create_string_buffer(struct.pack("<IIQQ", PERF_TYPE_TRACEPOINT, 128,
                                                   tracepoint_id(name), 1), 128)
    fd = libc.syscall(NR_PERF_EVENT_OPEN, attr, -1, 0, -1, 0)
    if fd < 0:
        sys.exit(f"perf_event_open({name}): {os.strerror(ctypes.get_errno())}")
    for req, arg in ((PERF_EVENT_IOC_SET_BPF, prog_fd), (PERF_EVENT_IOC_ENABLE, 0)):
        if libc.ioctl(fd, req, arg) < 0:
            sys.exit(f"ioctl({name}): {os.strerror(ctypes.get_errno())}")
    return fd


def attach_raw(prog_fd, name):
    tp = ctypes.create_string_buffer(name.encode())
    attr = ctypes.create_string_buffer(struct.pack("<QI", ctypes.addressof(tp), prog_fd), 128)
    fd = libc.syscall(NR_BPF, BPF_RAW_TRACEPOINT_OPEN, attr, 128)
    if fd < 0:
        sys.exit(f"BPF_RAW_TRACEPOINT_OPEN({name}): {os.strerror(ctypes.get_errno())}")
    return fd


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["empty", "calls", "regs", "ktime", "stack", "lookup", "map", "raw"])
    ap.add_argument("n", nargs="?", type=int, default=0)
    ap.add_argument("--syscalls", default="recvfrom,writev")
    a = ap.parse_args()
    if a.kind == "raw":
        held = [attach_raw(load(EXIT, BPF_PROG_TYPE_RAW_TRACEPOINT), "sys_exit")]
        where = "every syscall (raw sys_exit)"
    else:
        if a.kind in ("stack", "map") and not 0 < a.n <= 256:
            sys.exit(f"{a.kind} needs a byte count from 1 to 256")
        if a.kind in ("empty", "calls"):
            prog = load(program(a.n if a.kind == "calls" else 0))
        else:
            prog = load(copy_program(a.kind, a.n, map_create(256)))
        held = [attach(prog, f"sys_exit_{s}") for s in a.syscalls.split(",")]
        where = a.syscalls
    print(f"attached: {a.kind} {a.n} on {where}", flush=True)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    sys.stdin.read()
    del held


if __name__ == "__main__":
    main()

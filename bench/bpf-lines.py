#!/usr/bin/env python3
"""Where Tapir's kernel programs spend their time, by source line.

    bench/bpf-lines.py --pid PID [--seconds 5] [--top 30]

Run it as root while `tapir run` is attached and PID (e.g. the nginx worker) is busy. It
samples PID with `perf record` (software clock, no hardware counters needed), then maps
every sample that landed inside a loaded `tapir_*` program (or one of its subprograms) to
the Rust source line the JIT emitted it for, using the kernel's JIT line table
(BPF_OBJ_GET_INFO_BY_FD: line_info + jited_line_info, line text from the program's BTF).
Debian's bpftool cannot do this: it is built without libbfd, so `prog dump jited` fails.

How to read it: a clock sample lands on the instruction the CPU was about to retire, so
the cost of a helper or subprogram call shows up on the instruction after the call (its
return). On hosts whose kernel returns through a mitigation thunk (AMD's SRSO "Safe RET",
retbleed), each such return is a mispredicted branch: count calls, not instructions.
"""
import argparse
import bisect
import collections
import ctypes
import os
import struct
import subprocess
import sys
import tempfile

SYS_BPF = 321  # x86_64
BPF_PROG_GET_NEXT_ID, BPF_PROG_GET_FD_BY_ID = 11, 13
BPF_OBJ_GET_INFO_BY_FD, BPF_BTF_GET_FD_BY_ID = 15, 19
PROG_INFO_SIZE = 232  # struct bpf_prog_info up to attach_btf_id (Linux 6.x)

libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(bytes(attr), 128)
    rc = libc.syscall(SYS_BPF, cmd, buf, 128)
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc, buf


def obj_info(fd, size, pointers=()):
    """BPF_OBJ_GET_INFO_BY_FD; `pointers`: (offset, struct format, values) to fill in first."""
    info = ctypes.create_string_buffer(size)
    for off, fmt, values in pointers:
        struct.pack_into(fmt, info, off, *values)
    bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, size, ctypes.addressof(info)))
    return info


def prog_ids():
    pid = 0
    while True:
        try:
            _, buf = bpf(BPF_PROG_GET_NEXT_ID, struct.pack("<I", pid))
        except OSError:
            return
        pid = struct.unpack_from("<I", buf, 4)[0]
        yield pid


def btf_strings(btf_id):
    fd, _ = bpf(BPF_BTF_GET_FD_BY_ID, struct.pack("<I", btf_id))
    try:
        size = struct.unpack_from("<I", obj_info(fd, 32), 8)[0]
        raw = ctypes.create_string_buffer(size)
        obj_info(fd, 32, [(0, "<QI", (ctypes.addressof(raw), size))])
    finally:
        os.close(fd)
    hdr_len, = struct.unpack_from("<I", raw, 4)
    str_off, str_len = struct.unpack_from("<II", raw, 16)
    return raw.raw[hdr_len + str_off : hdr_len + str_off + str_len]


def line_table(prog_id):
    """[(jited address, "file:line  source text")] of one program, or [] if not ours."""
    fd, _ = bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("<I", prog_id))
    try:
        info = obj_info(fd, PROG_INFO_SIZE)
        name = info.raw[64:80].split(b"\0")[0].decode()
        if not name.startswith("tapir_"):
            return name, []
        btf_id, = struct.unpack_from("<I", info, 128)
        nr_lines, = struct.unpack_from("<I", info, 148)
        nr_jited, = struct.unpack_from("<I", info, 168)
        line_rec, jited_rec = struct.unpack_from("<II", info, 172)
        if not (btf_id and nr_lines and nr_jited == nr_lines):
            return name, []
        lines = ctypes.create_string_buffer(nr_lines * line_rec)
        jited = ctypes.create_string_buffer(nr_jited * jited_rec)
        obj_info(
            fd,
            PROG_INFO_SIZE,
            [
                (148, "<I", (nr_lines,)),
                (152, "<QQ", (ctypes.addressof(lines), ctypes.addressof(jited))),
                (168, "<III", (nr_jited, line_rec, jited_rec)),
            ],
        )
    finally:
        os.close(fd)
    strs = btf_strings(btf_id)

    def text(off):
        return strs[off : strs.index(b"\0", off)].decode(errors="replace")

    table = []
    for i in range(nr_lines):
        _insn, file_off, line_off, line_col = struct.unpack_from("<IIII", lines, i * line_rec)
        addr, = struct.unpack_from("<Q", jited, i * jited_rec)
        where = f"{os.path.basename(text(file_off))}:{line_col >> 10}"
        table.append((addr, f"{where:<18} {text(line_off).strip()[:100]}"))
    return name, table


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pid", type=int, required=True, help="process to sample")
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--top", type=int, default=30, help="lines to show")
    args = ap.parse_args()

    table = []
    names = []
    for prog_id in prog_ids():
        name, lines = line_table(prog_id)
        if lines:
            names.append(name)
            table += lines
    if not table:
        sys.exit("no tapir_* program with line info is loaded: start `tapir run` first")
    table.sort()
    addrs = [a for a, _ in table]

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        subprocess.run(
            ["perf", "record", "-q", "-F", "4000", "-p", str(args.pid), "-o", data,
             "--", "sleep", str(args.seconds)],
            check=True, stdout=subprocess.DEVNULL,
        )
        script = subprocess.run(
            ["perf", "script", "-i", data, "-F", "ip,sym"],
            check=True, capture_output=True, text=True,
        ).stdout

    total = 0
    by_prog = collections.Counter()
    by_line = collections.Counter()
    for row in script.splitlines():
        parts = row.split()
        total += 1
        if len(parts) != 2 or not parts[1].startswith("bpf_prog_"):
            continue
        ip = int(parts[0], 16)
        by_prog[parts[1].split("_", 3)[-1]] += 1
        i = bisect.bisect_right(addrs, ip) - 1
        by_line[table[i][1] if i >= 0 else "?"] += 1
    inside = sum(by_prog.values())
    print(f"{total} samples of pid {args.pid}; {inside} ({100 * inside / max(total, 1):.1f} %) "
          f"inside the programs' own code ({len(names)} programs with line info)")
    for prog, n in by_prog.most_common():
        print(f"  {n:6d}  {prog}")
    print("\nby source line (a call's cost lands on the line of the call):")
    for line, n in by_line.most_common(args.top):
        print(f"  {n:6d} {100 * n / max(inside, 1):5.1f} %  {line}")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# What the kernel charges for calling an eBPF program from a syscall, before the program
# does anything: `dd bs=1` (a read and a write per byte, /dev/zero to /dev/null) on one
# core, without programs, with an empty program on the sys_exit_read and sys_exit_write
# tracepoints (as Tapir hooks them, through bpftrace), with one on sys_exit_writev only (a
# call dd never makes: its reads and writes then take the traced-syscall path without
# calling a program), and with an empty raw tracepoint program on sys_exit (called for every
# syscall). Prints dd's system time per call for each, ROUNDS times in alternation.
#
# Context for BENCHMARKS.md (session 15), not part of `cargo xtask bench`. Needs root,
# bpftrace (Debian: apt-get install bpftrace) and python3.
# Usage: bench/tracepoint-floor.sh [ROUNDS] [BYTES]
set -euo pipefail
ROUNDS=${1:-5}
BYTES=${2:-2000000}
CPU=${CPU:-1}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

cat > "$work/rw.bt" <<'EOF'
tracepoint:syscalls:sys_exit_read,tracepoint:syscalls:sys_exit_write { $x = 1; }
EOF
cat > "$work/write.bt" <<'EOF'
tracepoint:syscalls:sys_exit_writev { $x = 1; }
EOF
# bpftrace 0.17 has no raw tracepoints: load `r0 = 0; exit` as BPF_PROG_TYPE_RAW_TRACEPOINT
# and attach it with BPF_RAW_TRACEPOINT_OPEN, straight through bpf(2).
cat > "$work/raw.py" <<'EOF'
import ctypes, signal, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    fd = libc.syscall(321, cmd, buf, 128)  # __NR_bpf on x86_64
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"bpf({cmd})")
    return fd
insns = ctypes.create_string_buffer(struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0))
gpl = ctypes.create_string_buffer(b"GPL")
prog = bpf(5, struct.pack("<IIQQ", 17, 2, ctypes.addressof(insns), ctypes.addressof(gpl)))
name = ctypes.create_string_buffer(sys.argv[1].encode())
link = bpf(17, struct.pack("<QI", ctypes.addressof(name), prog))
print("attached", flush=True)
signal.pause()
EOF

sys_ns() {
    /usr/bin/time -f "%S" taskset -c "$CPU" dd if=/dev/zero of=/dev/null bs=1 count="$BYTES" 2>&1 |
        tail -1 | awk -v n="$BYTES" '{printf "%.0f", $1 / (2 * n) * 1e9}'
}
# Runs `sys_ns` while "$@" is attached (it prints "Attaching" or "attached" when it is).
with() {
    "$@" > "$work/out" 2>&1 &
    local pid=$!
    for _ in $(seq 100); do grep -qi attach "$work/out" && break; sleep 0.1; done
    sleep 0.5
    sys_ns
    kill "$pid"; wait "$pid" 2>/dev/null || true
}

declare -A got
for _ in $(seq "$ROUNDS"); do
    got[none]+=" $(sys_ns)"
    got[tp_read_write]+=" $(with bpftrace "$work/rw.bt")"
    got[tp_other_only]+=" $(with bpftrace "$work/write.bt")"
    got[raw_sys_exit]+=" $(with python3 "$work/raw.py" sys_exit)"
done
echo "dd system time per read/write call (ns), $ROUNDS rounds:"
for k in none tp_other_only tp_read_write raw_sys_exit; do
    printf "  %-14s %s  (median %s)\n" "$k" "${got[$k]}" \
        "$(tr ' ' '\n' <<< "${got[$k]}" | grep . | sort -n | awk '{v[NR]=$1} END{print (NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2}')"
done

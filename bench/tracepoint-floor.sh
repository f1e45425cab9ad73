#!/usr/bin/env bash
# What the kernel charges for calling an eBPF program from a syscall, and what each helper
# Tapir's programs call adds: `dd bs=1` (a read and a write per byte, /dev/zero to
# /dev/null) on one core, without programs and with each VARIANT attached in turn by
# `bench/program-floor.py` (a variant is its arguments, e.g. "empty --syscalls read,write",
# "map 64 --syscalls read,write", "raw"). Prints dd's CPU time (user + system) per call for
# each, ROUNDS times in alternation, and the medians.
#
# The default variants are session 15's floor: an empty program on sys_exit_writev only (a
# call dd never makes: its reads and writes then take the traced-syscall path without
# calling a program), one on sys_exit_read and sys_exit_write (as Tapir hooks them), and an
# empty raw tracepoint program on sys_exit (called for every syscall). Session 24's
# helper table (BENCHMARKS.md, finding 24b) is, for instance:
#   bench/tracepoint-floor.sh 5 1000000 "empty --syscalls read,write" \
#     "regs --syscalls read,write" "ktime --syscalls read,write" \
#     "lookup --syscalls read,write" "map 64 --syscalls read,write"
#
# Context for BENCHMARKS.md (sessions 15 and 24), not part of `cargo xtask bench`. Needs
# root and python3.
# Usage: bench/tracepoint-floor.sh [ROUNDS] [BYTES] [VARIANT...]
set -euo pipefail
ROUNDS=${1:-5}
BYTES=${2:-2000000}
shift $(( $# < 2 ? $# : 2 ))
if [ $# -eq 0 ]; then
    set -- "empty --syscalls writev" "empty --syscalls read,write" "raw"
fi
CPU=${CPU:-1}
floor="$(dirname "$0")/program-floor.py"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

cpu_ns() {
    /usr/bin/time -f "%S %U" taskset -c "$CPU" dd if=/dev/zero of=/dev/null bs=1 count="$BYTES" 2>&1 |
        tail -1 | awk -v n="$BYTES" '{printf "%.0f", ($1 + $2) / (2 * n) * 1e9}'
}
# Runs `cpu_ns` while the variant's program is attached (program-floor.py says
# "attached" once it is, and detaches when its stdin closes).
with() {
    mkfifo "$work/in"
    # shellcheck disable=SC2086 # a variant is several arguments
    python3 "$floor" $1 < "$work/in" > "$work/out" 2>&1 &
    local pid=$!
    exec 9> "$work/in"
    for _ in $(seq 100); do grep -q attached "$work/out" && break; sleep 0.05; done
    grep -q attached "$work/out" || { cat "$work/out" >&2; exit 1; }
    cpu_ns
    exec 9>&-
    wait "$pid"
    rm -f "$work/in"
}

declare -A got
for _ in $(seq "$ROUNDS"); do
    got[none]+=" $(cpu_ns)"
    for v in "$@"; do got[$v]+=" $(with "$v")"; done
done
echo "dd CPU time per read/write call (ns), $ROUNDS rounds:"
for k in none "$@"; do
    printf "  %-32s %s  (median %s)\n" "$k" "${got[$k]}" \
        "$(tr ' ' '\n' <<< "${got[$k]}" | grep . | sort -n | awk '{v[NR]=$1} END{print (NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2}')"
done

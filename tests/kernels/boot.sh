#!/bin/bash
# Boots a Debian kernel package under qemu with a small userland in its initramfs (busybox,
# the tapir binary, python3 and curl with their libraries) and runs guest.sh in it.
#
#   boot.sh PACKAGE TAPIR OUTDIR
#
# PACKAGE is a Debian kernel image package or meta-package (linux-image-cloud-amd64 is
# Debian 12's 6.1 LTS); a meta-package is resolved to the image it currently depends on.
# SUITE/PACKAGE takes it from another Debian release (see fetch_from_suite).
# OUTDIR gets guest.log (what guest.sh printed, on the VM's second serial port),
# console.log (the kernel's console) and the unpacked kernel, kept for later runs.
# Software emulation (TCG) by default: nested KVM on this project's cloud machines crawls
# through the kernel's decompressor; TAPIR_VM_ACCEL=kvm uses KVM where it works.
# One host thread runs both vCPUs (thread=single). With a thread each, a vCPU can keep
# running the old code of a kernel site the other vCPU patched: when the agent detaches
# and a tracepoint's static key flips while a task exits through that tracepoint, both
# vCPUs loop on the int3 at do_exit's sched_process_exit site ("soft lockup" on the
# console) and the VM never ends. CI hit it on 6.1; here 1 in ~15-20 agent stops did.
set -euo pipefail
PKG=$1 TAPIR=$2 OUT=$3
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# SUITE/PACKAGE (e.g. bullseye/linux-image-cloud-amd64: Debian 11's 5.10) is looked up in
# that suite's package indexes (the archive and its security updates, or archive.debian.org
# once the suite has moved there), which this host's apt sources need not list; a plain
# PACKAGE goes through apt. Prints "image url sha256" of the newest image the package
# names.
resolve_in_suite() { # suite package indexfile
    local suite=$1 pkg=$2 idx=$3 base best="" v image
    : >"$idx"
    for base in http://deb.debian.org/debian/dists/$suite \
        http://security.debian.org/debian-security/dists/$suite-security \
        http://archive.debian.org/debian/dists/$suite \
        http://archive.debian.org/debian-security/dists/$suite-security; do
        { curl -fsL -m 120 "$base/main/binary-amd64/Packages.xz" 2>/dev/null | xz -dq 2>/dev/null |
            awk -v b="${base%%/dists/*}" '/^Package:/{p=$2; d=""; h=""} /^Version:/{v=$2}
                /^Depends:/{d=$0} /^SHA256:/{h=$2} /^Filename:/{f=$2}
                /^$/{if (p != "") print p, v, b "/" f, h, d; p=""}
                END{if (p != "") print p, v, b "/" f, h, d}' >>"$idx"; } || true
    done
    for v in $(awk -v p="$pkg" '$1 == p {print $2}' "$idx"); do
        if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
    done
    [ -n "$best" ] || { echo "boot.sh: $pkg not found in Debian's $suite indexes" >&2; return 2; }
    image=$(awk -v p="$pkg" -v v="$best" '$1 == p && $2 == v' "$idx" | cut -d' ' -f5- |
        grep -oE 'linux-image-[0-9][^ ,]*' | head -1 || true)
    [ -n "$image" ] || image=$pkg
    awk -v p="$image" '$1 == p {print $1, $3, $4}' "$idx" | tail -1 | grep . ||
        { echo "boot.sh: $image not found in Debian's $suite indexes" >&2; return 2; }
}

if [[ $PKG == */* ]]; then
    if ! found=$(resolve_in_suite "${PKG%%/*}" "${PKG#*/}" "$OUT/Packages"); then
        # Offline: the image unpacked by an earlier run, if any.
        found=$(cat "$OUT/resolved" 2>/dev/null) || exit 2
    fi
    rm -f "$OUT/Packages"
    read -r IMAGE URL SHA <<<"$found"
    echo "$found" >"$OUT/resolved"
    download_image() { # dir
        curl -fsSL -m 600 -o "$1/image.deb" "$URL" ||
            { echo "boot.sh: cannot download $URL" >&2; exit 2; }
        echo "$SHA  $1/image.deb" | sha256sum -c --quiet - ||
            { echo "boot.sh: $URL does not match its index's SHA256" >&2; exit 2; }
    }
else
    # A meta-package names its image in its dependencies.
    IMAGE=$PKG
    dep=$(apt-cache depends --important "$PKG" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}' || true)
    [ -n "$dep" ] && IMAGE=$dep
    download_image() { # dir
        (cd "$1" && apt-get download -q "$IMAGE" >/dev/null) || {
            echo "boot.sh: cannot download $IMAGE (apt-get update, or a Debian mirror, needed)" >&2
            exit 2
        }
    }
fi
# Downloaded once, unpacked atomically: a later run reuses a complete kernel only.
KDIR=$OUT/kernel-$IMAGE
if [ ! -d "$KDIR/boot" ]; then
    rm -rf "$OUT/debs" "$KDIR.part"
    mkdir -p "$OUT/debs" "$KDIR.part"
    download_image "$OUT/debs"
    dpkg-deb -x "$OUT"/debs/*.deb "$KDIR.part"
    mv "$KDIR.part" "$KDIR"
    rm -rf "$OUT/debs"
fi
VMLINUZ=$(ls "$KDIR"/boot/vmlinuz-*)

ROOT=$OUT/rootfs
rm -rf "$ROOT"
mkdir -p "$ROOT"/usr/{bin,lib,lib64} "$ROOT"/{etc,proc,sys,dev,tmp,run,root}
for d in bin sbin lib lib64; do ln -s "usr/${d/sbin/bin}" "$ROOT/$d"; done
cp /bin/busybox "$ROOT/usr/bin/busybox"
for a in $(/bin/busybox --list); do [ -e "$ROOT/usr/bin/$a" ] || ln -s busybox "$ROOT/usr/bin/$a"; done
# Files at their host paths, with the shared libraries ldd lists for them.
with_libs() {
    for f in "$@"; do
        mkdir -p "$ROOT$(dirname "$f")"
        cp -L "$f" "$ROOT$f"
        for l in $(ldd "$f" 2>/dev/null | grep -oE '/[^ ]+\.so[^ ]*' || true); do
            for p in "$l" "$(readlink -f "$l")"; do
                [ -e "$ROOT$p" ] || { mkdir -p "$ROOT$(dirname "$p")"; cp -L "$p" "$ROOT$p"; }
            done
        done
    done
}
PY=$(readlink -f /usr/bin/python3)
PYLIB=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
with_libs "$TAPIR" "$PY" "$(command -v curl)"
ln -sf "$TAPIR" "$ROOT/usr/bin/tapir"
ln -sf "$PY" "$ROOT/usr/bin/python3"
mkdir -p "$ROOT$PYLIB"
(cd "$PYLIB" && tar cf - --exclude=./test --exclude=./idlelib --exclude=./tkinter \
    --exclude=./turtledemo --exclude=./site-packages --exclude=./ensurepip .) | (cd "$ROOT$PYLIB" && tar xf -)
with_libs "$PYLIB"/lib-dynload/*.so
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\n' >"$ROOT/etc/group"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$ROOT/etc/hosts"
printf 'hosts: files\n' >"$ROOT/etc/nsswitch.conf"
echo tapir-vm >"$ROOT/etc/hostname"
cp "$HERE/guest.sh" "$ROOT/guest.sh"
cat >"$ROOT/init" <<'INIT'
#!/bin/sh
export PATH=/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
hostname tapir-vm
exec </dev/null >/dev/ttyS1 2>&1
sh /guest.sh
echo "=== guest.sh exit $?"
sync
echo o >/proc/sysrq-trigger
INIT
chmod +x "$ROOT/init"
(cd "$ROOT" && find . | cpio -o -H newc --quiet | gzip -1) >"$OUT/initramfs.gz"
rm -rf "$ROOT"

if [ "${TAPIR_VM_ACCEL:-tcg}" = kvm ]; then accel=(-enable-kvm -cpu host); else accel=(-accel tcg,thread=single -cpu max); fi
VM_TIMEOUT=${TAPIR_VM_TIMEOUT:-600}
rm -f "$OUT/guest.log" "$OUT/console.log"
rc=0
timeout "$VM_TIMEOUT" qemu-system-x86_64 "${accel[@]}" -m 2048 -smp 2 \
    -nographic -no-reboot -nic none -monitor none \
    -kernel "$VMLINUZ" -initrd "$OUT/initramfs.gz" \
    -append "console=ttyS0 panic=-1 rdinit=/init" \
    -serial "file:$OUT/console.log" -serial "file:$OUT/guest.log" </dev/null || rc=$?
if [ $rc -ne 0 ]; then
    echo "boot.sh: qemu exited with $rc ($([ $rc -eq 124 ] && echo "timed out after $VM_TIMEOUT s" || echo failed))" >&2
    # What the VM got to: the kernel's complaints, the end of its console, then of guest.sh's.
    echo "--- console.log, lockups, stalls and oopses" >&2
    grep -aE 'soft lockup|hung_task|stall|BUG:|Oops|Kernel panic|WARNING:' "$OUT/console.log" | head -n 20 >&2 || true
    echo "--- console.log, last 15 lines" >&2
    tail -n 15 "$OUT/console.log" >&2 || true
    echo "--- guest.log, last 40 lines" >&2
    tail -n 40 "$OUT/guest.log" >&2 || true
    exit $rc
fi
echo "$IMAGE"

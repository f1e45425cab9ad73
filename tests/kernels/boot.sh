#!/bin/bash
# Boots a Debian kernel package under qemu with a small userland in its initramfs (busybox,
# the tapir binary, python3 and curl with their libraries) and runs guest.sh in it.
#
#   boot.sh PACKAGE TAPIR OUTDIR
#
# PACKAGE is a Debian kernel image package or meta-package (linux-image-cloud-amd64 is
# Debian 12's 6.1 LTS); a meta-package is resolved to the image it currently depends on.
# OUTDIR gets guest.log (what guest.sh printed, on the VM's second serial port),
# console.log (the kernel's console) and the unpacked kernel, kept for later runs.
# Software emulation (TCG) by default: nested KVM on this project's cloud machines crawls
# through the kernel's decompressor; TAPIR_VM_ACCEL=kvm uses KVM where it works.
set -euo pipefail
PKG=$1 TAPIR=$2 OUT=$3
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# A meta-package names its image in its dependencies.
IMAGE=$PKG
dep=$(apt-cache depends --important "$PKG" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$dep" ] && IMAGE=$dep
KDIR=$OUT/kernel-$IMAGE
if [ ! -d "$KDIR/boot" ]; then
    rm -rf "$OUT/debs"; mkdir -p "$OUT/debs"
    (cd "$OUT/debs" && apt-get download -q "$IMAGE" >/dev/null) || {
        echo "boot.sh: cannot download $IMAGE (apt-get update, or a Debian mirror, needed)" >&2
        exit 2
    }
    mkdir -p "$KDIR"
    dpkg-deb -x "$OUT"/debs/*.deb "$KDIR"
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

if [ "${TAPIR_VM_ACCEL:-tcg}" = kvm ]; then accel=(-enable-kvm -cpu host); else accel=(-accel tcg,thread=multi -cpu max); fi
rm -f "$OUT/guest.log" "$OUT/console.log"
timeout "${TAPIR_VM_TIMEOUT:-600}" qemu-system-x86_64 "${accel[@]}" -m 2048 -smp 2 \
    -nographic -no-reboot -nic none -monitor none \
    -kernel "$VMLINUZ" -initrd "$OUT/initramfs.gz" \
    -append "console=ttyS0 panic=-1 rdinit=/init" \
    -serial "file:$OUT/console.log" -serial "file:$OUT/guest.log" </dev/null
echo "$IMAGE"

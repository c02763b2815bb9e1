#!/usr/bin/env bash
# Assembles the dom0 initramfs for the real-Xen tests from Debian's binary packages (downloaded
# with `apt-get download`, unpacked with `dpkg-deb -x` into the cache folder, never installed):
# the Xen toolstack (xl, xenstored, xenconsoled, xen-init-dom0, xenstore tools) and its
# libraries, busybox-static, Debian's generic kernel (linux-image-amd64) and its Xen modules, plus mcdist's binaries
# (built with --features mcdist-xen/xen against the same Debian Xen libraries), the test guest
# (examples/xen-guest.S) and the dom0 test script (examples/xen-dom0-test.sh).
#
# Usage: xen-dom0.sh [--linux] OUT.cpio.gz BINARY...
#   BINARY: mcdist-xen-dom0 (required), and for the fork test mcdist and xen_memtap (the
#   example), all built with --features mcdist-xen/xen.
#   --linux: also a Linux PVH guest under /mcdist/linux: the same Debian kernel (vmlinuz)
#   and a busybox initramfs (initrd.gz) whose /init prints MCDIST_LINUX_UP and, with
#   `mcdist.fork` on its command line, runs examples/xen-linux-fork.S.
# Prints the dom0 kernel's path, then the initramfs path. Needs root for apt-get (or sudo).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
linux=0
if [ "${1:-}" = --linux ]; then linux=1; shift; fi
out="$1"
shift

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
for tool in cpio as ld readelf strip; do
    command -v "$tool" >/dev/null || { echo "xen-dom0.sh: $tool is missing" >&2; exit 1; }
done

cache="${MCDIST_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/mcdist}"
# Debian's generic kernel: the cloud flavour is built without CONFIG_XEN_DOM0.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
if [ -z "$kpkg" ]; then
    $SUDO apt-get update -qq
    kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
fi
[ -n "$kpkg" ] || { echo "xen-dom0.sh: cannot resolve Debian's linux-image-amd64" >&2; exit 1; }

# The toolstack's packages and the libraries they (and mcdist's binaries) load.
pkgs=(xen-utils-4.17 xen-utils-common xenstore-utils libxenmisc4.17 libxenstore4 libxencall1
    libxendevicemodel1 libxenevtchn1 libxenforeignmemory1 libxengnttab1 libxenhypfs1
    libxentoolcore1 libxentoollog1 libyajl2 libzstd1 zlib1g liblzma5 libuuid1 libext2fs2
    libcom-err2 libncurses6 libtinfo6 libbz2-1.0 libc6 libgcc-s1 busybox-static
    "$kpkg")
# The toolstack must be the version of the Xen libraries mcdist's binaries link.
xenver=$(dpkg-query -W -f='${Version}' libxen-dev 2>/dev/null || true)
stamp=$(echo "${pkgs[*]} $xenver" | sha256sum | cut -c1-12)
root="$cache/xen/dom0-root-$stamp"
if [ ! -e "$root/.complete" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    chmod 755 "$work"
    want=()
    for p in "${pkgs[@]}"; do
        case "$p" in
        xen-utils-4.17 | xen-utils-common | xenstore-utils | libxen*)
            if [ -n "$xenver" ]; then want+=("$p=$xenver"); else want+=("$p"); fi ;;
        *) want+=("$p") ;;
        esac
    done
    (cd "$work" && apt-get download -q "${want[@]}" >/dev/null 2>&1) || {
        $SUDO apt-get update -qq
        (cd "$work" && apt-get download -q "${want[@]}" >/dev/null)
    }
    rm -rf "$root"
    mkdir -p "$root"
    for d in "$work"/*.deb; do
        case "$(basename "$d")" in
        linux-image-*)
            mkdir -p "$work/k"
            dpkg-deb -x "$d" "$work/k"
            mkdir -p "$root/modules" "$root/kernel"
            cp "$work"/k/boot/vmlinuz-* "$root/kernel/"
            for m in xen-evtchn xen-privcmd xen-gntdev xen-gntalloc xenfs; do
                find "$work/k/lib/modules" -name "$m.ko*" -exec cp {} "$root/modules/" \;
            done
            ;;
        *) dpkg-deb -x "$d" "$root" ;;
        esac
    done
    rm -rf "$root/usr/share" "$root/boot" "$root/usr/lib/python3" "$root"/usr/lib/xen-4.17/lib/python*
    touch "$root/.complete"
fi

# The initramfs tree: Debian's files, then ours.
tree=$(mktemp -d)
trap 'rm -rf "$tree" ${work:+"$work"}' EXIT
cp -a "$root"/. "$tree"/
rm -rf "$tree/.complete" "$tree/kernel"
kernel=$(ls "$root"/kernel/vmlinuz-* | head -1)
mkdir -p "$tree"/{proc,sys,dev,run,tmp,var/lib/xen,var/lib/xenstored,var/log/xen,lib64,bin,sbin,mcdist}
ln -sfn /run "$tree/var/run"
ln -sfn /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$tree/lib64/ld-linux-x86-64.so.2"
for b in "$@"; do
    [ -x "$b" ] || { echo "xen-dom0.sh: $b is not an executable" >&2; exit 1; }
    strip -o "$tree/mcdist/$(basename "$b")" "$b"
done
[ -x "$tree/mcdist/mcdist-xen-dom0" ] || { echo "xen-dom0.sh: mcdist-xen-dom0 not given" >&2; exit 1; }
# Every library the binaries need must come from the unpacked Debian packages.
for f in "$tree"/mcdist/* "$tree"/usr/lib/xen-4.17/bin/xl; do
    for lib in $(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        if [ ! -e "$tree/lib/x86_64-linux-gnu/$lib" ] && [ ! -e "$tree/usr/lib/x86_64-linux-gnu/$lib" ]; then
            echo "xen-dom0.sh: $(basename "$f") needs $lib, which no unpacked package provides" >&2
            exit 1
        fi
    done
done
as --32 -o "$tree/mcdist/guest.o" "$here/xen-guest.S"
cat >"$tree/mcdist/guest.ld" <<'LD'
ENTRY(_start)
SECTIONS {
    . = 0x100000;
    .text : { *(.text) }
    .rodata : { *(.rodata) }
    .note.Xen : { *(.note.Xen) }
    .bss : { *(.bss) }
    /DISCARD/ : { *(.note.gnu*) *(.comment) }
}
LD
ld -m elf_i386 --build-id=none -z noexecstack -T "$tree/mcdist/guest.ld" -o "$tree/mcdist/guest.elf" "$tree/mcdist/guest.o"
rm -f "$tree/mcdist/guest.o" "$tree/mcdist/guest.ld"
cp "$here/xen-dom0-test.sh" "$tree/mcdist/test.sh"
if [ "$linux" = 1 ]; then
    # The domU's initramfs: busybox and the fork workload. Markers go to /dev/kmsg at a
    # level that passes `quiet`; earlyprintk=xen shows them on Xen's console (port 0xe9).
    g="$tree/mcdist/linux/root"
    mkdir -p "$g"/{bin,proc,dev}
    cp "$root/bin/busybox" "$g/bin/"
    for app in sh mount cat cut uname poweroff; do ln -s busybox "$g/bin/$app"; done
    as --64 -o "$tree/mcdist/linux/fork.o" "$here/xen-linux-fork.S"
    ld -static --build-id=none -z noexecstack -o "$g/fork" "$tree/mcdist/linux/fork.o"
    cat >"$g/init" <<'GINIT'
#!/bin/sh
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
echo "<2>MCDIST_LINUX_UP uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)" >/dev/kmsg
case " $(cat /proc/cmdline) " in
*" mcdist.fork "*) exec /fork ;;
esac
poweroff -f
GINIT
    chmod 755 "$g/init"
    (cd "$g" && find . | cpio -o -H newc --quiet | gzip -9 >"$tree/mcdist/linux/initrd.gz")
    rm -rf "$g" "$tree/mcdist/linux/fork.o"
    cp "$kernel" "$tree/mcdist/linux/vmlinuz"
fi
cp "$tree/bin/busybox" "$tree/bin/busybox.static" 2>/dev/null || true
for app in sh mount mkdir ln cat grep sed sleep insmod ip poweroff ls echo awk seq tail head rm touch wc kill ps date cut tr expr timeout; do
    [ -e "$tree/bin/$app" ] || ln -s busybox "$tree/bin/$app"
done
cat >"$tree/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin:/usr/lib/xen-4.17/bin:/mcdist
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Lines written to /dev/kmsg reach Xen's serial console with the kernel's (printk.devkmsg=on).
exec </dev/null >/dev/kmsg 2>&1
mount -t tmpfs tmpfs /run
mkdir -p /run/xen /run/xenstored /dev/shm /dev/pts
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
# Debian's 6.1.1xx kernels make privcmd opens wait for xenstore to come up (a domU
# restriction), but dom0's own xenstored needs privcmd to come up: lift the restriction.
for m in xen-evtchn "xen-privcmd unrestricted=1" xen-gntdev xen-gntalloc xenfs; do
    set -- $m
    insmod /modules/$1.ko "$2" || echo "insmod $1 failed"
done
mkdir -p /proc/xen && mount -t xenfs xenfs /proc/xen
ip link set lo up
ip link set lo multicast on
ip route add 239.255.0.0/16 dev lo
echo "MCDIST_DOM0_INIT $(cut -d' ' -f1 /proc/uptime)"
test=$(sed -n 's/.*mcdist\.test=\([a-z_]*\).*/\1/p' /proc/cmdline)
sh /mcdist/test.sh "$test"
echo "MCDIST_DOM0_EXIT $?"
poweroff -f
INIT
chmod 755 "$tree/init"
(cd "$tree" && find . | cpio -o -H newc --quiet | gzip -1 >"$out")
echo "$kernel"
echo "$out"

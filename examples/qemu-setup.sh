#!/usr/bin/env bash
# Installs what QEMU clones need, from Debian's packages only, and unpacks Debian's cloud
# kernel (linux-image-cloud-amd64: LZ4, boots in about 2 s under TCG) into the cache folder
# that mcdist-qemu searches ($MCDIST_CACHE, else $XDG_CACHE_HOME/mcdist, else ~/.cache/mcdist).
# Idempotent; prints the kernel's path last. Needs root for apt-get (or sudo).
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v fusermount3 >/dev/null || missing+=(fuse3)
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v ip >/dev/null || missing+=(iproute2)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}" >&2
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cache="${MCDIST_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/mcdist}"
dest="$cache/kernel"
existing=$(ls "$dest"/boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort | tail -1 || true)
if [ -z "$existing" ]; then
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
    if [ -z "$pkg" ]; then
        $SUDO apt-get update -qq
        pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
    fi
    if [ -z "$pkg" ]; then
        echo "cannot resolve Debian's linux-image-cloud-amd64 package" >&2
        exit 1
    fi
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # apt-get download writes into the current folder; _apt must be able to write there.
    chmod 755 "$work"
    (cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1 || (cd "$work" && apt-get download "$pkg"))
    mkdir -p "$dest"
    mkdir -p "$work/root"
    # Only the kernel image is needed: unpack ./boot from the package (as dpkg -x would).
    dpkg-deb --fsys-tarfile "$work"/*.deb | tar -x -C "$work/root" ./boot
    mkdir -p "$dest/boot"
    cp "$work"/root/boot/vmlinuz-* "$dest/boot/"
    existing=$(ls "$dest"/boot/vmlinuz-*-cloud-amd64 | sort | tail -1)
fi
echo "$existing"

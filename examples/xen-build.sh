#!/usr/bin/env bash
# Builds Debian's Xen 4.17 hypervisor with memory paging (which Debian's binary package leaves
# out: CONFIG_MEM_PAGING depends on CONFIG_UNSUPPORTED) and caches it. Hypervisor only
# (`make -C xen`); the toolstack stays Debian's binary packages.
#
# Source: `apt-get source xen` through a private apt state whose only entries are a deb-src copy
# of the machine's own Debian sources file (the host's apt configuration is not changed).
# Config: Debian's /boot/xen-4.17-amd64.config (from xen-hypervisor-4.17-amd64, unpacked only),
# plus CONFIG_UNSUPPORTED=y and CONFIG_MEM_PAGING=y.
# Cache: $cache/xen/<source version>-<config hash>/xen.gz (and xen.config, build.log); an
# existing xen.gz is reused. Prints the path of xen.gz last. Needs root for apt-get (or sudo).
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

cache="${MCDIST_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/mcdist}"
mkdir -p "$cache/xen"

# Build tools the hypervisor needs (kconfig wants flex and bison).
missing=()
for tool in flex bison make gcc dpkg-source; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    pkgs=()
    for tool in "${missing[@]}"; do
        case "$tool" in
        dpkg-source) pkgs+=(dpkg-dev) ;;
        *) pkgs+=("$tool") ;;
        esac
    done
    echo "installing ${pkgs[*]}" >&2
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi

# A private apt state with deb-src entries derived from the machine's Debian sources.
apt_dir="$cache/xen/apt"
mkdir -p "$apt_dir/sources.list.d" "$apt_dir/lists/partial" "$apt_dir/archives/partial"
src_file=""
for f in /etc/apt/sources.list.d/*.sources; do
    if grep -q '^Types:.*deb' "$f" && grep -q 'debian' "$f"; then src_file="$f"; break; fi
done
if [ -n "$src_file" ]; then
    sed 's/^Types:.*/Types: deb-src/' "$src_file" >"$apt_dir/sources.list.d/debian-src.sources"
elif [ -f /etc/apt/sources.list ]; then
    sed -n 's/^deb \(.*\)/deb-src \1/p' /etc/apt/sources.list >"$apt_dir/sources.list.d/debian-src.list"
else
    echo "no Debian apt sources found to derive deb-src entries from" >&2
    exit 1
fi
APT_OPTS=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::Archives=$apt_dir/archives"
    -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache=" -o "APT::Sandbox::User=root")

srcvers() { apt-cache "${APT_OPTS[@]}" showsrc xen 2>/dev/null | awk '/^Version:/{print $2}' | sort -rV; }
versions=$(srcvers || true)
if [ -z "$versions" ]; then
    apt-get "${APT_OPTS[@]}" update -qq
    versions=$(srcvers)
fi
if [ -z "$versions" ]; then
    echo "cannot resolve Debian's xen source package" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
extra=$'CONFIG_UNSUPPORTED=y\nCONFIG_MEM_PAGING=y'
cfg_dir="$cache/xen/debian-config"
mkdir -p "$cfg_dir"
cfg_hash() { (cat "$cfg_dir/xen-$1.config"; echo "$extra") | sha256sum | cut -c1-12; }

# Reuse a build of any available source version, newest first.
for v in $versions; do
    if [ -s "$cfg_dir/xen-$v.config" ] && [ -s "$cache/xen/$v-$(cfg_hash "$v")/xen.gz" ]; then
        echo "$cache/xen/$v-$(cfg_hash "$v")/xen.gz"
        exit 0
    fi
done

# The newest source version the archive actually serves (a mirror may lack the newest).
version=""
for v in $versions; do
    if (cd "$work" && apt-get "${APT_OPTS[@]}" source --download-only -qq "xen=$v" >/dev/null 2>&1); then
        version=$v
        break
    fi
    rm -f "$work"/xen_*
done
if [ -z "$version" ]; then
    echo "cannot download any of Debian's xen source versions: $versions" >&2
    exit 1
fi

# Debian's hypervisor config, from the binary package of the same version.
debcfg="$cfg_dir/xen-$version.config"
if [ ! -s "$debcfg" ]; then
    mkdir -p "$work/hv"
    (cd "$work/hv" && apt-get download -q "xen-hypervisor-4.17-amd64=$version" >/dev/null 2>&1)
    dpkg-deb --fsys-tarfile "$work"/hv/xen-hypervisor-*.deb | tar -x -C "$work/hv" ./boot
    cp "$work"/hv/boot/xen-4.17-amd64.config "$debcfg"
    rm -rf "$work/hv"
fi
out="$cache/xen/$version-$(cfg_hash "$version")"

echo "building Xen $version hypervisor with memory paging (config ${out##*-})" >&2
start=$(date +%s)
(cd "$work" && dpkg-source -x "$work"/xen_*.dsc "$work/xen-src" >/dev/null)
tree="$work/xen-src"
(cat "$debcfg"; echo "$extra") >"$tree/xen/.config"
PY=python3
[ -x /usr/bin/python3 ] && PY=/usr/bin/python3
mkdir -p "$out.tmp"
{
    make -C "$tree/xen" PYTHON="$PY" olddefconfig
    make -C "$tree/xen" PYTHON="$PY" -j"${MCDIST_XEN_JOBS:-$(nproc)}"
} >"$out.tmp/build.log" 2>&1 || {
    tail -40 "$out.tmp/build.log" >&2
    exit 1
}
grep -q '^CONFIG_MEM_PAGING=y' "$tree/xen/.config" || {
    echo "CONFIG_MEM_PAGING did not stick in the hypervisor config" >&2
    exit 1
}
cp "$tree/xen/.config" "$out.tmp/xen.config"
gzip -9 -c "$tree/xen/xen" >"$out.tmp/xen.gz"
echo "$(($(date +%s) - start))" >"$out.tmp/build-seconds"
rm -rf "$out"
mv "$out.tmp" "$out"
echo "built in $(cat "$out/build-seconds")s" >&2
echo "$out/xen.gz"

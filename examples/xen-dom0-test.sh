#!/bin/sh
# Runs inside the dom0 initramfs built by examples/xen-dom0.sh (busybox sh). Starts the Xen
# toolstack, then runs one test, printing MCDIST_* marker lines on the console for the host:
#   paging: create a paused PVH domU, enable mem_paging on it through mcdist-xen's libxenctrl
#           path, page a few gfns out and back in.
#   fork:   run a parent domU until it asks to be forked, freeze it, serve its memory with
#           `mcdist serve` on dom0's loopback, and start clones whose memory is all paged out;
#           each clone's memtap pages it in over mcdist (every page verified against the
#           descriptor's root). Clones print their result on Xen's console.
up() { cut -d' ' -f1 /proc/uptime; }
fail() { echo "MCDIST_FAIL $*"; xl dmesg | tail -30; exit 1; }
# Wait (bounded: $2 tenths of a second) until `xl dmesg` shows $1; prints the line.
wait_dmesg() {
    n=0
    while [ "$n" -lt "$2" ]; do
        line=$(xl dmesg | grep -m1 "$1") && { echo "$line"; return 0; }
        sleep 0.1
        n=$((n + 1))
    done
    return 1
}

xenstored --pid-file /run/xenstored.pid || fail "xenstored"
echo "MCDIST_XENSTORED $(up)"
xen-init-dom0 || fail "xen-init-dom0"
xenconsoled --pid-file=/run/xenconsoled.pid || fail "xenconsoled"
echo "MCDIST_TOOLSTACK_UP $(up)"
xl info | grep -E '^(xen_version|virt_caps|total_memory|free_memory)'

MEM=32
PAGES=$((MEM * 256))
cfg() {
    cat >"/run/$1.cfg" <<CFG
name = "$1"
type = "pvh"
kernel = "/mcdist/guest.elf"
memory = $MEM
maxmem = $MEM
vcpus = 1
on_poweroff = "preserve"
on_crash = "preserve"
CFG
    echo "/run/$1.cfg"
}

case "$1" in
paging)
    t0=$(up)
    xl create -p "$(cfg probe)" >/run/xl.log 2>&1 || { cat /run/xl.log; fail "xl create -p"; }
    domid=$(xl domid probe)
    echo "MCDIST_DOMU_CREATED domid=$domid $t0 -> $(up)"
    mcdist-xen-dom0 enable-paging "$domid" 8 || fail "enable-paging"
    xl destroy probe
    echo "MCDIST_PAGING_OK"
    ;;
fork)
    N=2
    GROUP=239.255.66.18:7000
    t0=$(up)
    xl create "$(cfg parent)" >/run/xl.log 2>&1 || { cat /run/xl.log; fail "xl create parent"; }
    pd=$(xl domid parent)
    wait_dmesg "(d$pd) MCDIST_FORK" 3000 >/dev/null || fail "parent never asked to be forked"
    xl pause parent
    t1=$(up)
    echo "MCDIST_PARENT_FROZEN domid=$pd $t0 -> $t1"
    mcdist-xen-dom0 dump "$pd" "$PAGES" /run/parent.mem || fail "dump"
    xen_memtap --write-descriptor /run/parent.mcdx --image /run/parent.mem || fail "descriptor"
    mcdist serve --image /run/parent.mem --group "$GROUP" --iface lo --listen 127.0.0.1:7001 \
        --push off --timeout 600 >/run/serve.log 2>&1 &
    serve=$!
    i=0
    while [ "$i" -lt "$N" ]; do
        c0=$(up)
        xl create -p "$(cfg clone$i)" >/run/xl.log 2>&1 || { cat /run/xl.log; fail "xl create clone$i"; }
        cd=$(xl domid clone$i)
        mcdist-xen-dom0 clone-context "$pd" "$cd" "$i" "$N" || fail "clone-context"
        rm -f "/run/stop$i"
        xen_memtap --domid "$cd" --descriptor /run/parent.mcdx --group "$GROUP" --iface lo \
            --server 127.0.0.1:7001 --stop-file "/run/stop$i" --timeout 600 >"/run/memtap$i.log" 2>&1 &
        eval "memtap$i=\$!"
        n=0
        until grep -q "paged out" "/run/memtap$i.log"; do
            [ "$n" -lt 3000 ] || { cat "/run/memtap$i.log"; fail "memtap$i setup"; }
            sleep 0.1
            n=$((n + 1))
        done
        grep "paged out" "/run/memtap$i.log"
        xl unpause "clone$i"
        echo "MCDIST_CLONE_STARTED id=$i domid=$cd $c0 -> $(up)"
        i=$((i + 1))
    done
    i=0
    while [ "$i" -lt "$N" ]; do
        cd=$(xl domid clone$i)
        line=$(wait_dmesg "(d$cd) MCDIST_RESULT" 6000) || { cat "/run/memtap$i.log"; fail "clone$i gave no result"; }
        echo "MCDIST_CLONE_DONE id=$i $(up) $line"
        touch "/run/stop$i"
        eval "wait \$memtap$i"
        echo "MCDIST_MEMTAP id=$i $(grep -E 'Stats|client' "/run/memtap$i.log" | tr '\n' ' ')"
        i=$((i + 1))
    done
    kill "$serve" 2>/dev/null
    echo "MCDIST_FORK_OK"
    ;;
*)
    echo "MCDIST_IDLE (no mcdist.test= on the kernel command line)"
    ;;
esac

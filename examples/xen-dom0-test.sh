#!/bin/sh
# Runs inside the dom0 initramfs built by examples/xen-dom0.sh (busybox sh). Starts the Xen
# toolstack, then runs one test, printing MCDIST_* marker lines on the console for the host:
#   paging: create a paused PVH domU, enable mem_paging on it through mcdist-xen's libxenctrl
#           path, page a few gfns out and back in.
#   fork:   run a parent domU until it asks to be forked, freeze it, serve its memory with
#           `mcdist serve` on dom0's loopback, and start clones whose memory is all paged out;
#           each clone's memtap pages it in over mcdist (every page verified against the
#           descriptor's root). Clones print their result on Xen's console.
#   linux:  boot a Linux PVH domU (Debian's kernel, busybox initramfs) to its /init, which
#           prints MCDIST_LINUX_UP (needs xen-dom0.sh --linux).
#   linux_fork: fork, with the Linux domU as parent: its userspace fills the table and
#           spins; dom0 pauses it in user mode, and the clones (empty PVH containers of the
#           same shape, given the parent's whole HVM context) resume that Linux userspace.
up() { cut -d' ' -f1 /proc/uptime; }
# Print stdin one line per write, cut short and without colours: /dev/kmsg, where dom0's
# output goes, takes one record per write and refuses long ones.
show() { sed 's/\x1b\[[0-9;]*m//g' | cut -c1-300 | while IFS= read -r l; do echo "$l"; done; }
fail() { echo "MCDIST_FAIL $*"; xl dmesg | tail -30 | show; exit 1; }
# xl, bounded and retried: under TCG a dom0 process occasionally dies of a bad TLS pointer
# after fork (a segfault at a fixed busybox address), which a second attempt does not repeat.
xlr() {
    for _ in 1 2 3; do
        timeout 60 xl "$@" && return 0
        sleep 0.5
    done
    return 1
}
# Is process $1 alive (not a zombie)?
alive() { [ -e "/proc/$1" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat"; }
# Wait (bounded: $2 seconds; and while process $3, if given, lives) until `xl dmesg`
# shows $1; prints the line.
wait_dmesg() {
    end=$(($(cut -d. -f1 /proc/uptime) + $2))
    while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
        line=$(timeout 20 xl dmesg | grep -m1 "$1") && { echo "$line"; return 0; }
        if [ -n "${3:-}" ] && ! alive "$3"; then return 1; fi
        sleep 0.2
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
$TSC
on_poweroff = "preserve"
on_crash = "preserve"
CFG
    echo "/run/$1.cfg"
}
TSC=""
# Pause domain $1 (id $2) while its vCPU is in user mode (bounded retries); prints where.
pause_in_user() {
    for _ in $(seq 1 50); do
        xlr pause "$1" || return 1
        where=$(mcdist-xen-dom0 where "$2") || return 1
        case "$where" in *ring=3*) echo "$where"; return 0 ;; esac
        xlr unpause "$1"
        sleep 0.1
    done
    return 1
}

# The Linux domU. tsc_mode "native": with Xen's default TSC emulation on this TSC, every
# RDTSC/RDTSCP exits to Xen, and QEMU's nested SVM reports RDTSCP as an RDTSC exit without
# a next-RIP; Xen then decodes 0f 01 f9 (RDTSCP) where it expects RDTSC, injects #GP and
# the kernel dies early ("Insn mismatch: Expected opcode 0xf0031 ... SVM Insn len
# emulation failed"). `quiet` keeps the boot log off Xen's console (each byte on port 0xe9
# is a VM exit); the markers are printed at a level above it.
LMEM=128
lcfg() {
    cat >"/run/$1.cfg" <<CFG
name = "$1"
type = "pvh"
kernel = "/mcdist/linux/vmlinuz"
ramdisk = "/mcdist/linux/initrd.gz"
extra = "console=hvc0 earlyprintk=xen keep_bootcon quiet printk.time=0 nowatchdog rdinit=/init $2"
memory = $LMEM
maxmem = $LMEM
vcpus = 1
tsc_mode = "native"
on_poweroff = "preserve"
on_crash = "preserve"
CFG
    echo "/run/$1.cfg"
}

# Create clone $1 paused with the parent's ($pd) vCPU state, and start its memtap; sets $cd.
# Returns 1, with the clone destroyed, when the memtap died before paging the clone out
# (a dom0 process crash under TCG, as for xlr): the caller tries once more.
start_clone() {
    xlr create -p "$(cfg clone$1)" >/run/xl.log 2>&1 || { cat /run/xl.log; fail "xl create clone$1"; }
    cd=$(xlr domid clone$1)
    mcdist-xen-dom0 clone-context "$pd" "$cd" "$1" "$N" || fail "clone-context"
    rm -f "/run/stop$1"
    RUST_LOG=info xen_memtap --domid "$cd" --descriptor /run/parent.mcdx --group "$GROUP" --iface lo \
        --server 127.0.0.1:7001 --stop-file "/run/stop$1" --timeout 600 >"/run/memtap$1.log" 2>&1 &
    eval "memtap$1=\$!"
    n=0
    until grep -q "paged out" "/run/memtap$1.log"; do
        if ! alive "$(eval "echo \$memtap$1")"; then
            echo "memtap$1 died before paging clone$1 out:"
            show <"/run/memtap$1.log"
            xlr destroy "clone$1"
            return 1
        fi
        [ "$n" -lt 3000 ] || { show <"/run/memtap$1.log"; fail "memtap$1 setup"; }
        sleep 0.1
        n=$((n + 1))
    done
}

case "$1" in
linux)
    t0=$(up)
    xlr create "$(lcfg linux)" >/run/xl.log 2>&1 || { cat /run/xl.log; fail "xl create linux"; }
    d=$(xlr domid linux)
    t1=$(up)
    echo "MCDIST_LINUX_CREATED domid=$d $t0 -> $t1"
    line=$(wait_dmesg "(d$d) MCDIST_LINUX_UP" 300) || { xl list; fail "the Linux domU printed no MCDIST_LINUX_UP"; }
    echo "MCDIST_LINUX_BOOTED $t1 -> $(up) $line"
    xlr destroy linux
    ;;
paging)
    t0=$(up)
    xlr create -p "$(cfg probe)" >/run/xl.log 2>&1 || { cat /run/xl.log; fail "xl create -p"; }
    domid=$(xlr domid probe)
    echo "MCDIST_DOMU_CREATED domid=$domid $t0 -> $(up)"
    mcdist-xen-dom0 enable-paging "$domid" 8 || fail "enable-paging"
    xlr destroy probe
    echo "MCDIST_PAGING_OK"
    ;;
fork | linux_fork)
    N=2
    GROUP=239.255.66.18:7000
    t0=$(up)
    if [ "$1" = linux_fork ]; then
        # The clones are the tiny guest's empty PVH containers of the Linux parent's shape:
        # their memory is all paged out and their vCPU gets the parent's whole HVM context.
        MEM=$LMEM
        PAGES=$((MEM * 256))
        TSC='tsc_mode = "native"'
        pcfg=$(lcfg parent mcdist.fork)
    else
        pcfg=$(cfg parent)
    fi
    xlr create "$pcfg" >/run/xl.log 2>&1 || { cat /run/xl.log; fail "xl create parent"; }
    pd=$(xlr domid parent)
    wait_dmesg "(d$pd) MCDIST_FORK" 300 >/dev/null || fail "parent never asked to be forked"
    where=""
    if [ "$1" = linux_fork ]; then
        # Its userspace spins on %ebx: the clones' id goes there, so pause it in user mode.
        where=$(pause_in_user parent "$pd") || fail "parent not paused in user mode"
    else
        xlr pause parent
    fi
    t1=$(up)
    echo "MCDIST_PARENT_FROZEN domid=$pd $t0 -> $t1 $where"
    mcdist-xen-dom0 dump "$pd" "$PAGES" /run/parent.mem || fail "dump"
    xen_memtap --write-descriptor /run/parent.mcdx --image /run/parent.mem || fail "descriptor"
    RUST_LOG=info mcdist serve --image /run/parent.mem --group "$GROUP" --iface lo --listen 127.0.0.1:7001 \
        --push off --timeout 600 >/run/serve.log 2>&1 &
    serve=$!
    echo "MCDIST_IMAGE_SERVED $t1 -> $(up) $PAGES pages"
    i=0
    while [ "$i" -lt "$N" ]; do
        c0=$(up)
        start_clone "$i" || start_clone "$i" || fail "memtap$i died twice before paging clone$i out"
        grep "paged out" "/run/memtap$i.log"
        xlr unpause "clone$i"
        echo "MCDIST_CLONE_STARTED id=$i domid=$cd $c0 -> $(up)"
        i=$((i + 1))
    done
    i=0
    while [ "$i" -lt "$N" ]; do
        cd=$(xlr domid clone$i)
        line=$(wait_dmesg "(d$cd) MCDIST_RESULT" 240 "$(eval "echo \$memtap$i")") || {
            echo "memtap$i:"; tail -20 "/run/memtap$i.log" | show
            echo "server:"; tail -20 /run/serve.log | show
            xl list; ps | grep -E 'xen_memtap|mcdist serve' | show
            fail "clone$i gave no result"
        }
        echo "MCDIST_CLONE_DONE id=$i $(up) $line"
        i=$((i + 1))
    done
    # Memtaps stop once every clone has reported (a clone's client stays in the session
    # until its siblings are done, as SnowFlock's clones do until sf_join).
    i=0
    while [ "$i" -lt "$N" ]; do
        touch "/run/stop$i"
        eval "wait \$memtap$i"
        echo "MCDIST_MEMTAP id=$i $(grep -E '^(domain [0-9]+: MemtapStats|client: )' "/run/memtap$i.log" | tr '\n' ' ')"
        i=$((i + 1))
    done
    kill "$serve" 2>/dev/null
    echo "MCDIST_FORK_OK"
    ;;
*)
    echo "MCDIST_IDLE (no mcdist.test= on the kernel command line)"
    ;;
esac

#!/usr/bin/env bash
# guest/build.sh -- build the tiny test guest used by reconciler's tests.
#
# Usage: guest/build.sh [--force] [OUTDIR]
#
# Produces OUTDIR/vmlinuz and OUTDIR/initrd.img (OUTDIR defaults to
# guest/out next to this script).  If both already exist the build is
# skipped unless --force is given.
#
# The kernel comes from Debian's linux-image-cloud-amd64 (the versioned
# package the metapackage depends on), fetched with `apt-get download` and
# unpacked with `dpkg-deb -x` -- nothing is installed on the host.  The
# initramfs is a gzip'd cpio (newc) holding a static busybox, a handful of
# kernel modules and a busybox-sh /init.
#
# Host requirements (Debian 12): apt, dpkg, coreutils, findutils, grep, sed,
# gzip (all Essential/standard) plus busybox-static (for /bin/busybox; if the
# host busybox is missing or dynamically linked the script downloads
# busybox-static with apt-get instead).  No root needed except when the apt
# package lists are empty and `apt-get update` has to be run.
#
# Environment overrides:
#   RG_KERNEL_PKG   versioned kernel package to use instead of resolving
#                   linux-image-cloud-amd64 (e.g. linux-image-6.1.0-56-cloud-amd64)
#   RG_BUSYBOX      path to a static busybox binary to put into the initramfs
#
# Guest kernel command line options understood by /init (all optional):
#   rg.ip=ADDR/PREFIX   load virtio-net, configure eth0 with ADDR/PREFIX, up
#   rg.gw=ADDR          default route via ADDR (needs rg.ip)
#   rg.ping=ADDR        after the network is up, ping ADDR (3 echo requests)
#                       and print "reconciler-guest: ping ADDR ok|failed"
#   rg.bootid=1         print "reconciler-guest: boot-id <16 hex chars>"
#   rg.mods=m1,m2       insmod extra bundled modules (with dependencies); names
#                       are module names (virtio_net, ...) or the groups
#                       acpi, pvpanic, net, blk (net/blk include virtio_pci)
#   rg.action=poweroff|reboot|panic   do it right after the "up" marker
#   rg.powerbtn=reboot  the ACPI power button reboots instead of powering off
# Always loaded: button+evdev (acpid power button), pvpanic(+mmio,+pci),
# virtio_pci+virtio_blk.  virtio_net is loaded for rg.ip.
# Console lines printed by /init:
#   reconciler-guest: up uptime=<seconds>                   (user space reached)
#   reconciler-guest: power button pressed, shutting down   (ACPI power button)

set -euo pipefail

PROG=${0##*/}
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "$PROG: error: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

usage() {
    sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

FORCE=0
OUTDIR=
while [ $# -gt 0 ]; do
    case $1 in
        -f|--force) FORCE=1 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option: $1 (see --help)" ;;
        *) [ -z "$OUTDIR" ] || die "only one OUTDIR may be given"; OUTDIR=$1 ;;
    esac
    shift
done
if [ $# -gt 0 ]; then
    if [ -n "$OUTDIR" ] || [ $# -ne 1 ]; then die "only one OUTDIR may be given"; fi
    OUTDIR=$1
fi
OUTDIR=${OUTDIR:-$SCRIPT_DIR/out}

# The cache is valid while this script is unchanged: a newer /init rebuilds it.
SCRIPT_SUM=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)
have_guest() {
    [ -s "$OUTDIR/vmlinuz" ] && [ -s "$OUTDIR/initrd.img" ] \
        && grep -qx "script_sha256=$SCRIPT_SUM" "$OUTDIR/build-info.txt" 2>/dev/null
}

if [ "$FORCE" = 0 ] && have_guest; then
    echo "$PROG: guest already built in $OUTDIR (vmlinuz, initrd.img); use --force to rebuild"
    exit 0
fi

mkdir -p "$OUTDIR" || die "cannot create output directory $OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)

# Serialise concurrent builds into the same OUTDIR.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$OUTDIR/.build.lock"
    flock 9 || die "cannot lock $OUTDIR/.build.lock"
    if [ "$FORCE" = 0 ] && have_guest; then
        echo "$PROG: guest already built in $OUTDIR (by a concurrent build)"
        exit 0
    fi
    # Temp dirs of killed builds: stale, since we hold the lock.
    rm -rf "$OUTDIR"/.build.??????
fi

for tool in apt-get apt-cache dpkg-deb find sort gzip; do
    command -v "$tool" >/dev/null 2>&1 || die "required tool '$tool' not found (Debian host expected)"
done

# Temp dir on the same filesystem as OUTDIR so the final mv is atomic.
WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX") || die "cannot create temp dir in $OUTDIR"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

APT_OPTS=(-q)
if [ "$(id -u)" = 0 ]; then
    # As root apt drops to _apt for downloads, which cannot write into our
    # 0700 temp dir; download as root instead (avoids a noisy warning).
    APT_OPTS+=(-o APT::Sandbox::User=root)
fi

apt_lists_updated=0
apt_update_once() {
    [ "$apt_lists_updated" = 0 ] || return 1
    apt_lists_updated=1
    log "apt has no data for the packages needed; running apt-get update"
    apt-get "${APT_OPTS[@]}" update >&2 || die "apt-get update failed (are you root? is a Debian mirror reachable?)"
}

# apt_download PKG DIR -> downloads PKG's .deb into DIR, sets DEB to its path.
DEB=
apt_download() {
    local pkg=$1 dir=$2
    mkdir -p "$dir"
    if ! (cd "$dir" && apt-get "${APT_OPTS[@]}" download "$pkg" >&2); then
        apt_update_once || die "apt-get download $pkg failed"
        (cd "$dir" && apt-get "${APT_OPTS[@]}" download "$pkg" >&2) || die "apt-get download $pkg failed"
    fi
    DEB=$(find "$dir" -maxdepth 1 -name "${pkg}_*.deb" | head -n1)
    [ -n "$DEB" ] || die "apt-get download $pkg produced no .deb"
}

# ---------------------------------------------------------------- kernel ---
resolve_kernel_pkg() {
    local out
    out=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
          | sed -n 's/^ *|\{0,1\}Depends: *\(linux-image-[0-9][^ ]*-cloud-amd64\) *$/\1/p' \
          | head -n1) || true
    echo "$out"
}

KPKG=${RG_KERNEL_PKG:-}
if [ -z "$KPKG" ]; then
    KPKG=$(resolve_kernel_pkg)
    if [ -z "$KPKG" ]; then
        apt_update_once || true
        KPKG=$(resolve_kernel_pkg)
    fi
    [ -n "$KPKG" ] || die "could not resolve linux-image-cloud-amd64 to a versioned kernel package (apt-cache depends linux-image-cloud-amd64)"
fi
log "kernel package: $KPKG"

apt_download "$KPKG" "$WORK/debs"
KDEB=$DEB
log "downloaded $(basename "$KDEB")"
mkdir -p "$WORK/kpkg"
dpkg-deb -x "$KDEB" "$WORK/kpkg" || die "dpkg-deb -x $KDEB failed"

shopt -s nullglob
vmlinuz=("$WORK"/kpkg/boot/vmlinuz-*)
moddirs=("$WORK"/kpkg/lib/modules/*/)
shopt -u nullglob
[ ${#vmlinuz[@]} -eq 1 ] || die "expected exactly one boot/vmlinuz-* in $KPKG, found ${#vmlinuz[@]}"
[ ${#moddirs[@]} -eq 1 ] || die "expected exactly one lib/modules/<version> in $KPKG, found ${#moddirs[@]}"
KVER=${vmlinuz[0]##*/vmlinuz-}
MODDIR=${moddirs[0]%/}
[ "${MODDIR##*/}" = "$KVER" ] || die "kernel version mismatch: vmlinuz-$KVER vs lib/modules/${MODDIR##*/}"
log "kernel version: $KVER"

# ------------------------------------------------------------- busybox ---
is_static() { [ -x "$1" ] && ! ldd "$1" >/dev/null 2>&1; }

BUSYBOX=${RG_BUSYBOX:-}
if [ -n "$BUSYBOX" ]; then
    is_static "$BUSYBOX" || die "RG_BUSYBOX=$BUSYBOX is not an executable static binary"
elif is_static /bin/busybox; then
    BUSYBOX=/bin/busybox
else
    log "/bin/busybox missing or not static (install busybox-static); downloading busybox-static"
    apt_download busybox-static "$WORK/debs"
    BBDEB=$DEB
    mkdir -p "$WORK/bbpkg"
    dpkg-deb -x "$BBDEB" "$WORK/bbpkg" || die "dpkg-deb -x $BBDEB failed"
    BUSYBOX=$WORK/bbpkg/bin/busybox
    is_static "$BUSYBOX" || die "busybox-static package did not contain a static bin/busybox"
fi
BB_APPLETS=" $("$BUSYBOX" --list | tr '\n' ' ') "
for applet in cpio insmod acpid ip ping setsid cttyhack poweroff sh; do
    case $BB_APPLETS in *" $applet "*) ;; *) die "$BUSYBOX lacks the '$applet' applet" ;; esac
done

# ------------------------------------------------------------- modules ---
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,root,var/log,etc/acpi/PWRF,lib/modules}
chmod 1777 "$ROOT/tmp"

declare -A KO=()        # normalised module name -> path of .ko[.xz|.zst|.gz]
while IFS= read -r -d '' f; do
    b=${f##*/}; b=${b%%.ko*}; b=${b//-/_}
    KO[$b]=$f
done < <(find "$MODDIR/kernel" \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) -print0)

declare -A BUILTIN=()
if [ -f "$MODDIR/modules.builtin" ]; then
    while IFS= read -r l; do
        b=${l##*/}; b=${b%.ko}; b=${b//-/_}
        BUILTIN[$b]=1
    done < "$MODDIR/modules.builtin"
fi

decompress() {  # decompress SRC DST
    local src=$1 dst=$2
    case $src in
        *.ko) cp "$src" "$dst" ;;
        *.ko.xz)
            if command -v xz >/dev/null 2>&1; then xz -dc "$src" > "$dst"
            else "$BUSYBOX" xzcat "$src" > "$dst"; fi ;;
        *.ko.gz) gzip -dc "$src" > "$dst" ;;
        *.ko.zst)
            command -v zstd >/dev/null 2>&1 || die "module $src is zstd-compressed; install the 'zstd' package"
            zstd -q -dc "$src" > "$dst" ;;
        *) die "unexpected module file $src" ;;
    esac
}

declare -A COPIED=() SKIPPED=()
ORDER=()            # per-call topological order (dependencies first)
declare -A SEEN=()

visit() {  # visit NAME: append NAME's dependency closure to ORDER
    local m=${1//-/_} f deps d
    [ -n "$m" ] || return 0
    [ -z "${SEEN[$m]:-}" ] || return 0
    SEEN[$m]=1
    f=${KO[$m]:-}
    if [ -z "$f" ]; then
        if [ -n "${BUILTIN[$m]:-}" ]; then
            SKIPPED[$m]="built in"
        else
            SKIPPED[$m]="not found"
        fi
        return 0
    fi
    if [ -z "${COPIED[$m]:-}" ]; then
        decompress "$f" "$ROOT/lib/modules/$m.ko" || die "cannot extract module $f"
        COPIED[$m]=${f#"$MODDIR"/}
    fi
    deps=$(tr '\0' '\n' < "$ROOT/lib/modules/$m.ko" | grep -a -m1 '^depends=' || true)
    deps=${deps#depends=}
    for d in ${deps//,/ }; do
        visit "$d"
    done
    ORDER+=("$m")
}

# Module groups that /init may load (name -> modules whose closure is loaded).
# "virtio_pci" is listed explicitly: virtio_net/virtio_blk do not depend on
# it, but without it no virtio PCI device is ever bound.
declare -A MODGROUPS=(
    [acpi]="button evdev"
    [pvpanic]="pvpanic pvpanic_mmio pvpanic_pci"
    [net]="virtio_pci virtio_net"
    [blk]="virtio_pci virtio_blk"
)
{
    echo "# group/module: load order (dependencies first); generated by build.sh"
    for g in acpi pvpanic net blk; do
        ORDER=(); SEEN=()
        for m in ${MODGROUPS[$g]}; do visit "$m"; done
        echo "$g: ${ORDER[*]}"
    done
    # Per-module closures for rg.mods=...
    for m in $(printf '%s\n' "${!KO[@]}" | sort); do
        [ -n "${COPIED[$m]:-}" ] || continue
        ORDER=(); SEEN=()
        visit "$m"
        echo "$m: ${ORDER[*]}"
    done
} > "$ROOT/lib/modules/load-order"

for m in $(printf '%s\n' "${!COPIED[@]}" | sort); do
    log "module $m <- ${COPIED[$m]}"
done
for m in $(printf '%s\n' "${!SKIPPED[@]}" | sort); do
    log "module $m skipped (${SKIPPED[$m]})"
done
for m in button evdev; do
    [ -n "${COPIED[$m]:-}" ] || [ "${SKIPPED[$m]:-}" = "built in" ] \
        || die "module $m is neither a loadable module nor built in; power button would not work"
done

# ----------------------------------------------------------- initramfs ---
cp "$BUSYBOX" "$ROOT/bin/busybox"
chmod 0755 "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"
echo "$KVER" > "$ROOT/etc/reconciler-guest-kernel"

cat > "$ROOT/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
# Run by busybox acpid (conf dir /etc/acpi) for the ACPI power button.
# Run once only (/init may also call it for a press acpid missed).
mkdir /run/rg-power-button 2>/dev/null || exit 0
# Leading newline: the console may hold a half line (shell prompt).
printf '\r\n' > /dev/console
sync
case " $(cat /proc/cmdline) " in
    *" rg.powerbtn=reboot "*)
        echo "reconciler-guest: power button pressed, rebooting" > /dev/console
        reboot -f ;;
esac
echo "reconciler-guest: power button pressed, shutting down" > /dev/console
poweroff -f
EOF
chmod 0755 "$ROOT/etc/acpi/PWRF/00000080"

cat > "$ROOT/init" <<'EOF'
#!/bin/busybox sh
# reconciler test guest /init (PID 1).  Must never exit.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=linux

/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /run 2>/dev/null

say() { echo "reconciler-guest: $*"; }

# load GROUP-or-MODULE: insmod its closure (deps first), quietly.
load() {
    local line m
    line=$(grep -m1 "^$1:" /lib/modules/load-order 2>/dev/null) || {
        say "no such module: $1"; return 1; }
    for m in ${line#*:}; do
        [ -e "/sys/module/$m" ] && continue
        insmod "/lib/modules/$m.ko" >/dev/null 2>&1 || say "insmod $m failed"
    done
}

# Power button: button + evdev give /dev/input/event*, acpid maps KEY_POWER
# to /etc/acpi/PWRF/00000080.
load acpi
load pvpanic
load blk
i=0
while ! ls /dev/input/event* >/dev/null 2>&1 && [ $i -lt 50 ]; do
    usleep 20000; i=$((i + 1))
done
acpid -f -c /etc/acpi -l /dev/null -p /run/acpid.pid &
acpid_pid=$!
# A press that arrived after button.ko loaded but before acpid opened the
# event devices is lost for acpid; the ACPI counter still shows it.
i=0
while [ $i -lt 100 ]; do
    for l in "/proc/$acpid_pid"/fd/*; do
        case $(readlink "$l") in /dev/input/event*) break 2 ;; esac
    done
    [ -d /proc/$acpid_pid ] || { say "acpid failed to start"; break; }
    usleep 20000; i=$((i + 1))
done
read -r n _ 2>/dev/null </sys/firmware/acpi/interrupts/ff_pwr_btn
if [ "${n:-0}" -gt 0 ] 2>/dev/null; then
    /etc/acpi/PWRF/00000080 &
fi

RG_IP='' RG_GW='' RG_PING='' RG_BOOTID='' RG_ACTION='' RG_MODS=''
for arg in $(cat /proc/cmdline); do
    case $arg in
        rg.ip=*) RG_IP=${arg#*=} ;;
        rg.gw=*) RG_GW=${arg#*=} ;;
        rg.ping=*) RG_PING=${arg#*=} ;;
        rg.bootid=*) RG_BOOTID=${arg#*=} ;;
        rg.action=*) RG_ACTION=${arg#*=} ;;
        rg.mods=*) RG_MODS=${arg#*=} ;;
    esac
done

for m in $(echo "$RG_MODS" | tr ',' ' '); do
    load "$m"
done

ip link set lo up 2>/dev/null
if [ -n "$RG_IP" ]; then
    load net
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do
        usleep 50000; i=$((i + 1))
    done
    if [ -e /sys/class/net/eth0 ]; then
        if ! { ip addr add "$RG_IP" dev eth0 && ip link set eth0 up; }; then
            say "network setup failed"
        fi
        [ -z "$RG_GW" ] || ip route add default via "$RG_GW" || say "default route failed"
    else
        say "network setup failed: no eth0"
    fi
fi
if [ -n "$RG_PING" ]; then
    if ping -c 3 -i 0.2 -W 3 -w 10 "$RG_PING" >/dev/null 2>&1; then
        say "ping $RG_PING ok"
    else
        say "ping $RG_PING failed"
    fi
fi

if [ -n "$RG_BOOTID" ] && [ "$RG_BOOTID" != 0 ]; then
    id=$(tr -d '-' < /proc/sys/kernel/random/uuid | cut -c1-16)
    say "boot-id $id"
fi

read -r up _ < /proc/uptime
say "up uptime=$up"

case $RG_ACTION in
    "") ;;
    poweroff) sync; poweroff -f ;;
    reboot) sync; reboot -f ;;
    panic) sync; echo c > /proc/sysrq-trigger ;;
    *) say "unknown rg.action=$RG_ACTION" ;;
esac

# Stay up forever with a shell on the console.
while :; do
    setsid cttyhack sh
    sleep 1
done
EOF
chmod 0755 "$ROOT/init"

# Build the newc archive with busybox cpio (no GNU cpio needed), owned by
# root, then append a tiny hand-made archive with the /dev/console node so
# the kernel can open the console before /init runs (mknod would need root).
newc_entry() {  # newc_entry NAME MODE RMAJOR RMINOR  (no data)
    local name=$1 mode=$2 rmaj=$3 rmin=$4 namesize hdr pad
    namesize=$(( ${#name} + 1 ))
    hdr=$(printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        0 "$mode" 0 0 1 0 0 0 0 "$rmaj" "$rmin" "$namesize" 0)
    printf '%s%s\0' "$hdr" "$name"
    pad=$(( (4 - (110 + namesize) % 4) % 4 ))
    head -c "$pad" /dev/zero
}

(
    cd "$ROOT"
    find . | LC_ALL=C sort | "$BUSYBOX" cpio -o -H newc -R 0:0 2>/dev/null
    newc_entry dev $((0040755)) 0 0
    newc_entry dev/console $((0020600)) 5 1
    newc_entry TRAILER!!! 0 0 0
) > "$WORK/initrd.cpio" || die "creating the cpio archive failed"
gzip -9 -n < "$WORK/initrd.cpio" > "$WORK/initrd.img" || die "gzip failed"
cp "${vmlinuz[0]}" "$WORK/vmlinuz"

cat > "$WORK/build-info.txt" <<EOF
kernel_package=$KPKG
kernel_version=$KVER
modules=$(printf '%s\n' "${!COPIED[@]}" | sort | tr '\n' ' ')
busybox=$("$BUSYBOX" 2>&1 | head -n1)
script_sha256=$SCRIPT_SUM
EOF

# Move into place: build-info last (the cache check needs all three).
mv -f "$WORK/initrd.img" "$OUTDIR/initrd.img"
mv -f "$WORK/vmlinuz" "$OUTDIR/vmlinuz"
mv -f "$WORK/build-info.txt" "$OUTDIR/build-info.txt"
echo "$PROG: built guest in $OUTDIR (kernel $KVER, initrd $(stat -c %s "$OUTDIR/initrd.img") bytes)"

#!/usr/bin/env bash
# guest/build-debian.sh -- build a Debian 12 (bookworm) disk image for
# reconciler's tests of cloud-init guests.
#
# Usage: guest/build-debian.sh [--force] [OUTDIR]
#
# Produces OUTDIR/debian.raw (2 GiB sparse raw disk, ext4 on the whole disk,
# no partition table: boot it with root=/dev/vda), OUTDIR/vmlinuz and
# OUTDIR/initrd.img (for direct kernel boot).  OUTDIR defaults to
# guest/out-debian next to this script.  If all three exist and were built
# by this very script (sha256 in OUTDIR/build-info.txt) the build is skipped
# unless --force is given.
#
# Everything comes from Debian's own packages: debootstrap (minbase) from the
# mirror apt uses on this host, then apt-get inside the chroot for cloud-init,
# openssh-server, qemu-guest-agent, ifupdown, isc-dhcp-client and sudo.
# The guest:
#   - kernel linux-image-cloud-amd64; initramfs with virtio_blk/virtio_pci/ext4
#   - /etc/fstab: /dev/vda / ext4 defaults 0 1
#   - serial getty via console=ttyS0 (systemd-getty-generator)
#   - cloud-init with datasource_list [ NoCloud, None ]; module 'locale'
#     removed (minbase has no 'locales' package)
#   - qemu-guest-agent (started by udev when its virtio-serial port exists)
#   - root account locked (no password); log in via cloud-init users/keys
#   - empty /etc/machine-id, no ssh host keys (generated on first boot)
# Example boot:
#   qemu-system-x86_64 -m 1024 -serial stdio -kernel vmlinuz -initrd initrd.img \
#     -append 'console=ttyS0 root=/dev/vda rw' \
#     -drive file=debian.raw,if=virtio,format=raw
#
# Host requirements: Debian 12, root, a reachable Debian mirror.  Installs
# debootstrap and e2fsprogs with apt-get if they are missing.
#
# Environment overrides:
#   RG_DEBIAN_MIRROR   mirror URL (default: the bookworm mirror from
#                      /etc/apt/sources.list{,.d/*}, else deb.debian.org)
#   RG_IMAGE_SIZE      size of debian.raw (default 2G; truncate(1) syntax)

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
OUTDIR=${OUTDIR:-$SCRIPT_DIR/out-debian}
SUITE=bookworm
IMAGE_SIZE=${RG_IMAGE_SIZE:-2G}

# The cache is valid while this script is unchanged.
SCRIPT_SUM=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)
have_image() {
    [ -s "$OUTDIR/debian.raw" ] && [ -s "$OUTDIR/vmlinuz" ] && [ -s "$OUTDIR/initrd.img" ] \
        && grep -qx "script_sha256=$SCRIPT_SUM" "$OUTDIR/build-info.txt" 2>/dev/null
}

if [ "$FORCE" = 0 ] && have_image; then
    echo "$PROG: image already built in $OUTDIR (debian.raw, vmlinuz, initrd.img); use --force to rebuild"
    exit 0
fi

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, mounts)"

mkdir -p "$OUTDIR" || die "cannot create output directory $OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)

# Serialise concurrent builds into the same OUTDIR.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$OUTDIR/.build.lock"
    flock 9 || die "cannot lock $OUTDIR/.build.lock"
    if [ "$FORCE" = 0 ] && have_image; then
        echo "$PROG: image already built in $OUTDIR (by a concurrent build)"
        exit 0
    fi
fi

# ---------------------------------------------------------- host tools ---
apt_lists_updated=0
apt_update_once() {
    [ "$apt_lists_updated" = 0 ] || return 0
    apt_lists_updated=1
    log "running apt-get update"
    apt-get -q update >&2 || die "apt-get update failed (is a Debian mirror reachable?)"
}
need_pkgs=()
command -v debootstrap >/dev/null 2>&1 || need_pkgs+=(debootstrap)
command -v mkfs.ext4 >/dev/null 2>&1 || need_pkgs+=(e2fsprogs)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    apt_update_once
    log "installing host tools: ${need_pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends "${need_pkgs[@]}" >&2 \
        || die "apt-get install ${need_pkgs[*]} failed"
fi
for tool in debootstrap chroot mount umount mkfs.ext4 truncate findmnt; do
    command -v "$tool" >/dev/null 2>&1 || die "required tool '$tool' not found"
done

# -------------------------------------------------------------- mirror ---
# First URI serving suite $SUITE in the host's apt sources (one-line or
# deb822 format).
find_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v s="$SUITE" '
            $1 == "deb" {
                i = 2; if ($2 ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == s) { print $i; exit }
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v s="$SUITE" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && enabled != "no" && (" " suites " ") ~ (" " s " "))
                    { split(uris, u, " "); print u[1]; done = 1 }
                types = uris = suites = ""; enabled = ""
            }
            /^[ \t]*$/ { flush(); if (done) exit; next }
            /^#/ { next }
            { line = $0; key = tolower(line); sub(/:.*/, "", key); sub(/^[^:]*:[ \t]*/, "", line) }
            key == "types" { types = line }
            key == "uris" { uris = line }
            key == "suites" { suites = line }
            key == "enabled" { enabled = tolower(line) }
            END { if (!done) flush() }' "$f"
    done
}
MIRROR=${RG_DEBIAN_MIRROR:-}
if [ -z "$MIRROR" ]; then
    MIRROR=$(find_mirror | head -n1) || true
    if [ -z "$MIRROR" ]; then
        MIRROR=http://deb.debian.org/debian
        log "no $SUITE mirror found in /etc/apt/sources.list*, using $MIRROR"
    fi
fi
MIRROR=${MIRROR%/}
log "mirror: $MIRROR"

# ------------------------------------------------------------ work dir ---
# Temp dir on the same filesystem as OUTDIR so the final mv is atomic.
# Remove build dirs of killed builds (we hold the lock) -- but never while
# anything is still mounted below them.
safe_rm() {  # safe_rm DIR: unmount everything below DIR, then delete it
    local d=$1 m
    [ -d "$d" ] || return 0
    for m in $(findmnt -rn -o TARGET | grep -F "$d/" | sort -r); do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    if findmnt -rn -o TARGET | grep -qF "$d/"; then
        log "warning: $d still has mounts below it; not deleting it"
        return 1
    fi
    rm -rf --one-file-system "$d"
}
shopt -s nullglob
for stale in "$OUTDIR"/.build.??????; do safe_rm "$stale" || true; done
shopt -u nullglob

WORK=$(mktemp -d "$OUTDIR/.build.XXXXXX") || die "cannot create temp dir in $OUTDIR"
ROOTFS=$WORK/rootfs
cleanup() { safe_rm "$WORK" || true; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --------------------------------------------------------- debootstrap ---
START=$(date +%s)
log "debootstrap $SUITE into $ROOTFS"
debootstrap --variant=minbase \
    --include=systemd-sysv,dbus,udev,kmod,linux-image-cloud-amd64,initramfs-tools,iproute2 \
    "$SUITE" "$ROOTFS" "$MIRROR" >&2 \
    || die "debootstrap failed (see $ROOTFS/debootstrap/debootstrap.log if kept)"

mount_chroot() {
    mount -t proc proc "$ROOTFS/proc"
    mount -t sysfs sysfs "$ROOTFS/sys"
    mount --bind /dev "$ROOTFS/dev"
    mount --bind /dev/pts "$ROOTFS/dev/pts"
}
umount_chroot() {
    local m
    for m in dev/pts dev sys proc; do
        if findmnt -rn "$ROOTFS/$m" >/dev/null 2>&1; then
            umount "$ROOTFS/$m" || umount -l "$ROOTFS/$m"
        fi
    done
}
mount_chroot
in_chroot() {
    chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
}

# Keep services from starting inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$ROOTFS/usr/sbin/policy-rc.d"
chmod 0755 "$ROOTFS/usr/sbin/policy-rc.d"

cat > "$ROOTFS/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
EOF
log "installing cloud-init and friends in the chroot"
in_chroot apt-get -q update >&2 || die "apt-get update in the chroot failed"
in_chroot apt-get -q install -y --no-install-recommends \
    cloud-init openssh-server qemu-guest-agent ifupdown isc-dhcp-client sudo >&2 \
    || die "apt-get install in the chroot failed"

# ------------------------------------------------------------- configure ---
log "configuring the guest"
echo '/dev/vda / ext4 defaults 0 1' > "$ROOTFS/etc/fstab"
echo debian > "$ROOTFS/etc/hostname"
cat > "$ROOTFS/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	debian
::1		localhost ip6-localhost ip6-loopback
EOF

cat > "$ROOTFS/etc/cloud/cloud.cfg.d/90_reconciler.cfg" <<'EOF'
# reconciler test image: NoCloud (seed ISO / kernel cmdline), else None.
datasource_list: [ NoCloud, None ]
EOF
# minbase has no 'locales' package, so cc_locale would fail on every boot
# ('locale: false' works but fails cloud-init's schema check): drop it.
sed -i '/^ *- locale$/d' "$ROOTFS/etc/cloud/cloud.cfg"
! grep -q '^ *- locale$' "$ROOTFS/etc/cloud/cloud.cfg" || die "could not disable cc_locale"

# Networking via ifupdown (cloud-init renders ENI into interfaces.d).
if ! grep -qs '^source /etc/network/interfaces.d/' "$ROOTFS/etc/network/interfaces"; then
    cat > "$ROOTFS/etc/network/interfaces" <<'EOF'
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback
EOF
fi

# qemu-guest-agent's unit is started by udev once the virtio-serial port
# org.qemu.guest_agent.0 appears; enable it in case it has an [Install].
in_chroot systemctl enable qemu-guest-agent.service >&2 2>&1 || true

# No root password: keep the account locked.
in_chroot passwd -l root >&2

# Per-instance identity is created on first boot.
: > "$ROOTFS/etc/machine-id"
rm -f "$ROOTFS/var/lib/dbus/machine-id"
rm -f "$ROOTFS"/etc/ssh/ssh_host_*

# initramfs that can mount /dev/vda.
printf '%s\n' virtio_pci virtio_blk ext4 >> "$ROOTFS/etc/initramfs-tools/modules"
sed -i 's/^MODULES=.*/MODULES=most/' "$ROOTFS/etc/initramfs-tools/initramfs.conf"
in_chroot update-initramfs -u -k all >&2 || die "update-initramfs failed"

in_chroot apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin
rm -f "$ROOTFS/usr/sbin/policy-rc.d"
umount_chroot

# ---------------------------------------------------------------- output ---
shopt -s nullglob
vmlinuz=("$ROOTFS"/boot/vmlinuz-*)
initrd=("$ROOTFS"/boot/initrd.img-*)
shopt -u nullglob
[ ${#vmlinuz[@]} -eq 1 ] || die "expected exactly one boot/vmlinuz-*, found ${#vmlinuz[@]}"
[ ${#initrd[@]} -eq 1 ] || die "expected exactly one boot/initrd.img-*, found ${#initrd[@]}"
KVER=${vmlinuz[0]##*/vmlinuz-}
cp "${vmlinuz[0]}" "$WORK/vmlinuz"
cp "${initrd[0]}" "$WORK/initrd.img"
chmod 0644 "$WORK/vmlinuz" "$WORK/initrd.img"

log "creating $IMAGE_SIZE ext4 image"
truncate -s "$IMAGE_SIZE" "$WORK/debian.raw"
mkfs.ext4 -q -F -L rootfs -d "$ROOTFS" "$WORK/debian.raw" >&2 || die "mkfs.ext4 -d failed"

cat > "$WORK/build-info.txt" <<EOF
suite=$SUITE
mirror=$MIRROR
kernel_version=$KVER
cloud_init=$(chroot "$ROOTFS" dpkg-query -W -f '${Version}' cloud-init 2>/dev/null || echo unknown)
image_size=$IMAGE_SIZE
build_seconds=$(( $(date +%s) - START ))
script_sha256=$SCRIPT_SUM
EOF

# Move into place: build-info last (the cache check needs all of them).
mv -f "$WORK/debian.raw" "$OUTDIR/debian.raw"
mv -f "$WORK/initrd.img" "$OUTDIR/initrd.img"
mv -f "$WORK/vmlinuz" "$OUTDIR/vmlinuz"
mv -f "$WORK/build-info.txt" "$OUTDIR/build-info.txt"
echo "$PROG: built Debian $SUITE image in $OUTDIR (kernel $KVER, $(du -h "$OUTDIR/debian.raw" | cut -f1) used of $IMAGE_SIZE)"

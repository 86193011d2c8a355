#!/usr/bin/env bash
# Set everything up on a fresh Debian 12 machine, then reconcile the bundled example:
#   Debian packages (QEMU, qemu-img, busybox, dnsmasq, nftables, ssh), the `reconciler`
#   package in .venv, the busybox test guest (guest/out/), the Debian 12 cloud guest
#   (guest/out-debian/), the system user QEMU runs as (reconciler-qemu), a key for
#   examples/cloud/, and `reconcile --once --wait
#   examples/` (three real VMs; cloud-1 on a local switch you can `reconcile ssh` into).
# Usage: ./setup.sh [--no-run]      (--no-run: set up only)
set -euo pipefail
cd "$(dirname "$0")"

run_example=1
[ "${1:-}" = "--no-run" ] && run_example=0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

packages=(qemu-system-x86 qemu-utils busybox-static python3-venv iproute2 dnsmasq-base nftables
          openssh-client etcd-server etcd-client)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

# QEMU never runs as root: each VM's QEMU runs as this system user (or its `owner`),
# on descriptors the reconciler opens for it. In group kvm where the host has one.
if ! getent passwd reconciler-qemu >/dev/null; then
    echo "setup: creating system user reconciler-qemu"
    $sudo useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin reconciler-qemu
fi
if getent group kvm >/dev/null && ! id -nG reconciler-qemu | grep -qw kvm; then
    $sudo usermod -a -G kvm reconciler-qemu
fi

guest/build.sh
$sudo guest/build-debian.sh

# examples/cloud/ logs in with a key: yours if you have one, else one made here.
if [ ! -s examples/cloud/ops.pub ]; then
    for key in "$HOME/.ssh/id_ed25519.pub" "$HOME/.ssh/id_ecdsa.pub" "$HOME/.ssh/id_rsa.pub"; do
        if [ -s "$key" ]; then cp "$key" examples/cloud/ops.pub; break; fi
    done
fi
if [ ! -s examples/cloud/ops.pub ]; then
    ssh-keygen -q -t ed25519 -N '' -C "reconciler example" -f examples/cloud/ops_key
    cp examples/cloud/ops_key.pub examples/cloud/ops.pub
    echo "setup: made examples/cloud/ops_key; log in with: reconcile ssh cloud-1 -i examples/cloud/ops_key"
fi

if [ "$run_example" = 1 ]; then
    echo "setup: reconcile --once --wait examples/"
    .venv/bin/reconcile --once --wait examples/
    echo "setup: done. See them with: .venv/bin/reconcile status"
fi

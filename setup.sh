#!/usr/bin/env bash
# Set everything up on a fresh Debian 12 machine, then reconcile the bundled example:
#   Debian packages (QEMU, qemu-img, busybox), the `reconciler` package in .venv,
#   the test guest (guest/out/), and `reconcile --once examples/` (two real VMs).
# Usage: ./setup.sh [--no-run]      (--no-run: set up only)
set -euo pipefail
cd "$(dirname "$0")"

run_example=1
[ "${1:-}" = "--no-run" ] && run_example=0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

packages=(qemu-system-x86 qemu-utils busybox-static python3-venv iproute2)
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

guest/build.sh

if [ "$run_example" = 1 ]; then
    echo "setup: reconcile --once --wait examples/"
    .venv/bin/reconcile --once --wait examples/
    echo "setup: done. See them with: .venv/bin/reconcile status"
fi

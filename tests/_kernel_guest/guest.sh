#!/bin/sh
# Runs inside the QEMU guest of tests/_kernel_guest/boot.py, chrooted into the
# host's read-only root (only /run and /tmp are writable tmpfs).  KGUEST_PYTHON,
# KGUEST_TREE and KGUEST_MODULE (the Python module to run: the test's scenario
# or bench/mesh_kernel.py) come from the kernel command line.  The module prints
# one "KGUEST_RESULT {json}" line on the serial console for the host side.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$KGUEST_TREE"
cd "$KGUEST_TREE" || exit 1
mkdir -p /run/netns /run/wireguard
echo "KGUEST wireguard module loaded at start: $(test -d /sys/module/wireguard && echo yes || echo no)"
"$KGUEST_PYTHON" -m "${KGUEST_MODULE:-tests._kernel_guest.scenario}"

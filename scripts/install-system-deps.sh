#!/bin/sh
# Install the system packages that `make demo` or `make test` need, on Debian/Ubuntu.
#
#   scripts/install-system-deps.sh [demo|test]    (default: test, a superset of demo)
#
# As root it installs the missing ones with apt-get and says which; without root
# (or without apt) it prints the exact `apt-get install` line and exits 0, so the
# caller goes on with what is possible (the tests that need a missing tool skip
# with a one-line reason; the demo falls back to loopback and says why).
# CLANAGENT_NO_APT=1 only prints.  Used by the Makefile and by .ci/run.
#
# What and why:
#   demo + test:
#     python3-venv        make creates .venv with it
#     iproute2            network namespaces: each demo machine gets its own
#     iputils-ping        pings across them
#     wireguard-tools     the stock `wg`, which reads back what the agent set
#     wireguard-go        the userspace WireGuard backend (no module needed)
#     qemu-system-x86     the micro VM (TCG when there is no /dev/kvm)
#     linux-image-amd64   its kernel and modules (Ubuntu: linux-image-generic);
#                         also the kernel WireGuard module for the guest tests
#     busybox-static      the micro VM's initramfs
#     kmod                module autoload in the guests calls the host's modprobe
#     util-linux          `unshare` for the secret generator's sandbox
#   test only:
#     systemd             systemd-analyze verify; systemd as PID 1 in the unit's guest
#     passwd              useradd (a member of control.group in that guest)
#     tor                 onion services
#     chromium chromium-driver   the web console in a real headless browser
#                         (Ubuntu: chromium-browser chromium-chromedriver)
#     nftables            NAT routers and packet loss in namespaces (the NAT
#                         traversal and lossy-link tests)
#     zbar-tools          zbarimg reads the join token's QR code off the page
#     zsh fish            the generated shell completions are run in each shell
#     prometheus          a real Prometheus scrapes a real agent (and promtool
#                         checks the shipped alert rules)
set -eu

what=${1:-test}
case $what in
    demo | test) ;;
    *) echo "usage: $0 [demo|test]" >&2; exit 2 ;;
esac

id=; id_like=; osr=${CLANAGENT_OS_RELEASE:-/etc/os-release}
if [ -r "$osr" ]; then
    id=$(. "$osr" && echo "${ID:-}")
    id_like=$(. "$osr" && echo "${ID_LIKE:-}")
fi
kernel=linux-image-amd64
chromium="chromium chromium-driver"
case "$id $id_like" in
    *ubuntu*) kernel=linux-image-generic; chromium="chromium-browser chromium-chromedriver" ;;
esac

pkgs="python3-venv iproute2 iputils-ping wireguard-tools wireguard-go qemu-system-x86 $kernel busybox-static kmod util-linux"
if [ "$what" = test ]; then
    pkgs="$pkgs systemd passwd tor $chromium nftables zbar-tools zsh fish prometheus"
fi

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
    echo "system packages: no apt-get here; install the equivalents of: $pkgs"
    exit 0
fi

missing=
for p in $pkgs; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
        missing="$missing $p"
    fi
done
if [ -z "$missing" ]; then
    exit 0
fi

line="apt-get install -y --no-install-recommends$missing"
if [ "$(id -u)" != 0 ] || [ "${CLANAGENT_NO_APT:-}" = 1 ]; then
    echo "system packages missing for 'make $what':$missing"
    echo "  install them as root with:  $line"
    echo "  (going on without them: what needs them is skipped, with the reason)"
    exit 0
fi

echo "installing system packages for 'make $what':$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
echo "installed:$missing"

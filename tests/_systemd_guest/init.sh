#!/bin/busybox sh
# /init of the systemd guest's initramfs (tests/_systemd_guest/boot.py): load the
# virtio, 9p and overlay modules, mount the host's / read-only over 9p under a
# tmpfs overlay (a writable root that writes nothing to the host), mask host
# units that are slow or irrelevant here, add clanprobe.service (runs the host
# file named by `guest_script=` with the system python3 once the system is up,
# then powers off) and switch_root into systemd.  Unknown key=value words of the
# kernel command line arrive here as environment variables.
bb=/bin/busybox
$bb mkdir -p /proc /sys /dev /lower /upper /newroot
$bb mount -t proc proc /proc
$bb mount -t sysfs sys /sys
$bb mount -t devtmpfs dev /dev
for m in $($bb cat /mods/order); do
  $bb insmod "/mods/$m.ko" || echo "KGUEST insmod $m failed"
done
fail() { echo "KGUEST_FATAL $1"; $bb poweroff -f; }
$bb mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /lower || fail "no 9p root"
$bb mount -t tmpfs upper /upper
$bb mkdir -p /upper/u /upper/w
$bb mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot || fail "no overlay"
# /tmp stays the host's (under the overlay): the test's wheel is there.
E=/newroot/etc/systemd/system
# systemd-tmpfiles-setup takes > 90 s over 9p; the rest is the host's own business.
for u in systemd-tmpfiles-setup.service systemd-tmpfiles-clean.timer tor@default.service \
  tor.service avahi-daemon.service getty@tty1.service serial-getty@ttyS0.service \
  console-getty.service postgresql.service postgresql@15-main.service e2scrub_reap.service \
  systemd-networkd-wait-online.service NetworkManager-wait-online.service \
  apt-daily.timer apt-daily-upgrade.timer man-db.timer cron.service ssh.service; do
  $bb rm -f "$E/$u"; $bb ln -sf /dev/null "$E/$u"
done
# The guest installs clanagent.service itself, as the README says.
$bb rm -f "$E/clanagent.service" "$E/multi-user.target.wants/clanagent.service"
$bb cat > "$E/clanprobe.service" <<UNIT
[Unit]
Description=probe: install clanagent as the README says and check it under systemd
After=multi-user.target
[Service]
Type=oneshot
Environment="SYSD_TREE=${SYSD_TREE}" "SYSD_WHEEL=${SYSD_WHEEL}" "SYSD_DEPS=${SYSD_DEPS}" "KGUEST_PYTHON=${KGUEST_PYTHON}"
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/ttyS0
ExecStart=/usr/bin/python3 -u ${guest_script:-/bin/true}
ExecStopPost=/bin/systemctl --no-block poweroff
UNIT
$bb mkdir -p "$E/multi-user.target.wants"
$bb ln -sf "$E/clanprobe.service" "$E/multi-user.target.wants/clanprobe.service"
$bb umount /proc /sys /dev 2>/dev/null
echo KGUEST_UP
exec $bb switch_root /newroot /lib/systemd/systemd

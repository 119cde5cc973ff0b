#!/bin/busybox sh
# /init of the test's initramfs (built by tests/test_mesh_kernel_vm.py): load the
# virtio + 9p modules it carries, mount the host's / read-only over 9p, give it
# proc/sys/dev and a tmpfs /run (the only writable place), and run the host file
# named by `guest_script=` on the kernel command line inside that root.  Unknown
# key=value words of the command line arrive here as environment variables.
bb=/bin/busybox
$bb mkdir -p /proc /sys /dev /host
$bb mount -t proc proc /proc
$bb mount -t sysfs sys /sys
$bb mount -t devtmpfs dev /dev
for m in $($bb cat /mods/order); do
  $bb insmod "/mods/$m.ko" || echo "KGUEST insmod $m failed"
done
if ! $bb mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /host; then
  echo "KGUEST_FATAL no 9p root"; $bb poweroff -f
fi
$bb mount -t proc proc /host/proc
$bb mount -t sysfs sys /host/sys
$bb mount -t devtmpfs dev /host/dev
$bb mount -t tmpfs run /host/run
$bb mount -t tmpfs tmp /host/tmp
echo KGUEST_UP
$bb chroot /host /bin/sh "${guest_script:-/bin/true}"
echo "KGUEST_DONE rc=$?"
$bb poweroff -f

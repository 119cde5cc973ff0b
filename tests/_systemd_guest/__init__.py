"""A QEMU guest with systemd as PID 1 over the host root: see boot.py."""

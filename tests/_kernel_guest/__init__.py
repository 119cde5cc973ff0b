"""The guest side of tests/test_mesh_kernel_vm.py (runs inside a QEMU guest)."""

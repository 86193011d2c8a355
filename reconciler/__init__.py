"""reconciler: a declarative QEMU/KVM VM manager (see DESIGN.md)."""

__version__ = "0.1.0"

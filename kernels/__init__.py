"""Triton kernels of fastvl (installed as fastvl.kernels). Importing a kernel module registers its
kernels with the compile gate (registry.py)."""
import importlib
import pkgutil


def import_all():
    """Import every kernel module of this package, so that the compile gate sees all of them."""
    return [
        importlib.import_module(f"{__name__}.{m.name}")
        for m in pkgutil.iter_modules(__path__)
        if m.name != "registry"
    ]

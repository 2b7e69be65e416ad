"""Backends behind one interface: ``open_backend("ort" | "ort-cuda" | "trt", path, **options)``.

Only ``base`` is imported here; each implementation (and its runtime library) is imported
when its kind is first opened or checked.
"""
from runtime.backends.base import (
    Backend,
    available_backends,
    backend_class,
    backend_kinds,
    open_backend,
    register_backend,
    thread_options,
)

__all__ = ["Backend", "available_backends", "backend_class", "backend_kinds", "open_backend",
           "register_backend",
           "thread_options"]

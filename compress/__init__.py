"""Activation-aware mixed-rank compression of timm ViTs (METHOD.md §1-§5).

Importing the package registers the bundled CIFAR reference models with timm and stays
light (no model, no data, no CUDA touched). Public API::

    from compress import load_model, run, Config, load_compressed, CompressError
    model = load_model("deit_tiny_patch16_224")                 # random init, offline
    result = run(Config(model="vit_cifar_ref", ratio=0.5, out="runs/x"))
    model, manifest = load_compressed("runs/x")
"""
from . import reference_model, zoo  # noqa: F401  (registers vit_cifar_ref/_narrow and the zoo models with timm)
from .errors import CompressError

__all__ = ["CompressError", "Config", "load_compressed", "load_model", "run", "save_compressed"]


def __getattr__(name):  # lazy: keep `import compress` cheap
    if name == "load_model":
        from .models import load_model
        return load_model
    if name in ("run", "Config"):
        from . import pipeline
        return getattr(pipeline, name)
    if name in ("load_compressed", "save_compressed"):
        from . import artifact
        return getattr(artifact, name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")

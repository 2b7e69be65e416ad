"""Helpers for the hardening tests (a module name no other test folder uses)."""
from __future__ import annotations

from pathlib import Path

TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def compress_tiny(out, seed: int = 0) -> Path:
    """A real compress run of a 2-block, 64-wide vit_cifar_ref on 16 bundled images (~3 s)."""
    from compress.pipeline import Config, run

    return run(Config(model="vit_cifar_ref", model_kwargs=dict(TINY_VIT), pretrained=False, out=str(out),
                      num_calib=16, batch_size=8, ratio=0.3, comp_steps=2, comp_images=8, seed=seed,
                      stats_cache=None)).out


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root (hidden ones too) -> file bytes (None for folders)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(Path(root).rglob("*"))}


def error_lines(err: str) -> list[str]:
    """stderr without log lines of progress (INFO/DEBUG): what the user is told went wrong."""
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("INFO ", "DEBUG "))]

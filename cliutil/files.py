"""Every file the toolchain writes appears whole or not at all: written to a temporary name beside
its target, then moved into place with os.replace (a crash leaves at most a stale temporary,
which ``cliutil.remove_stale`` recognises). JSON, text, bytes, PNG figures and any writer that
takes a path (torch.save, safetensors, numpy) go through here.

    write_json(out / "sweep.json", doc)
    atomic_write_bytes(out / "pareto.png", figure_png(fig))
    with atomic_path(cache / "x.safetensors") as tmp: save_file(tensors, tmp)

Standard library only (matplotlib is imported by ``figure_png`` alone, when a figure exists).
"""
from __future__ import annotations

import io
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` (.<name>.<random>.tmp) to write; moved onto ``path``
    when the block ends without error, removed otherwise. Parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)  # mkstemp's 0600 would make results unreadable to other users
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def _jsonable(v):
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "item") and callable(v.item):   # numpy / torch scalars
        v = v.item()
        return None if isinstance(v, float) and not math.isfinite(v) else v
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def json_text(doc, indent: int | None = 2) -> str:
    """``doc`` as JSON with a final newline: Paths and numpy/torch values plain, NaN/Inf as null."""
    return json.dumps(_finite(doc), indent=indent, default=_jsonable) + "\n"


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def write_json(path: str | Path, doc, indent: int | None = 2) -> Path:
    """Atomic JSON write (``json_text``)."""
    return atomic_write_text(path, json_text(doc, indent))


def figure_png(fig, dpi: int = 110) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it (write them with atomic_write_bytes)."""
    import matplotlib.pyplot as plt  # lazy: a slow import, needed only to draw

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()

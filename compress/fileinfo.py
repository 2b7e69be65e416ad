"""What a file is, from its first bytes: for error messages that say what was found and what
was expected ("it is an empty file; expected a state dict ...") instead of a library's internals."""
from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_EXPECTED = ("expected a state dict of tensors saved with torch.save(model.state_dict()) "
                       "or a .safetensors file")


def describe(path: str | Path) -> str:
    """'an empty file', 'a zip archive', 'a Python pickle', 'a safetensors file', 'a text file'..."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(64)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if size == 0:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return f"a zip archive of {size:,} bytes (torch.save's format)"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return f"a Python pickle of {size:,} bytes"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return f"a safetensors file of {size:,} bytes"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8")):
        return "an image, not weights"
    if head.startswith(b"\x08") and b"onnx" in head.lower() or p.suffix == ".onnx":
        return "an ONNX model, not a weights file"
    try:
        head.decode("utf-8")
        return f"a text file of {size:,} bytes"
    except UnicodeDecodeError:
        return f"{size:,} bytes of unrecognised binary data"


def checkpoint_error(path: str | Path, exc: BaseException) -> str:
    """One line for a checkpoint that could not be read: what the file is, what was expected,
    and (briefly) why the reader refused it. Never suggests weights_only=False."""
    text = str(exc).strip()
    detail = ""
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if m:
        detail = f"; its pickle needs {m.group(1)}, code this loader never runs"
    elif "Weights only load failed" in text:
        detail = "; its pickle holds objects other than tensors, which this loader never unpickles"
    elif text and "weights_only" not in text:
        detail = f" ({type(exc).__name__}: {text.splitlines()[0][:120]})"
    return f"cannot read checkpoint {path}: it is {describe(path)}{detail}; {CHECKPOINT_EXPECTED}"

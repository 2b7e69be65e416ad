"""The run-directory layout, in one place: what each stage writes under a run directory D
(``make all OUT=D``, every sweep ratio and fit candidate, ``python -m runtime report --run-dir D``).

    D/compressed/   python -m compress         D/onnx/      python -m export
    D/bench/        python -m runtime bench    D/eval.json  python -m runtime eval
    D/report.md, D/accuracy_vs_size.png        python -m runtime report
"""
from __future__ import annotations

from pathlib import Path

from export import REPORT as EXPORT_REPORT

COMPRESSED, ONNX, BENCH, EVAL = "compressed", "onnx", "bench", "eval.json"
REPORT, PLOT = "report.md", "accuracy_vs_size.png"
# The JSON document each stage leaves, by the name the report uses for it.
SOURCES = {
    "manifest": f"{COMPRESSED}/manifest.json",
    "export": f"{ONNX}/{EXPORT_REPORT}",
    "bench": f"{BENCH}/bench.json",
    "eval": EVAL,
}


def ratio_dir(root, ratio: float) -> Path:
    """Run directory of one ratio: root/r0.3, root/r0.4375 ..."""
    return Path(root) / f"r{ratio:.4f}".rstrip("0").rstrip(".")

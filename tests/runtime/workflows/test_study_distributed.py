"""`torchrun -m runtime -- study ...` on 2 gloo ranks: the configurations are shared round-robin and
rank 0 writes the study one process writes (rows in the same order, equal but for wall times)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _rows(out: Path) -> list[dict]:
    rows = json.loads((out / "study.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k != "compress_seconds"} for r in rows]


def test_two_ranks_write_the_single_process_study(tmp_path):
    from runtime.__main__ import main

    # 4 configurations (rank 0: the 1st and 3rd, rank 1: the 2nd and 4th); whiten has 2 rows (fp32, INT8)
    args = ["study", "--model", "vit_cifar_ref", "--data", "cifar10-eval", "--num", "32", "--num-calib", "16",
            "--ratios", "0.5,0.6", "--variants", "plain,whiten", "--int8", "whiten", "--threads", "1",
            "--batch-size", "32", "--stats-cache", str(tmp_path / "cache")]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    # "--" keeps torchrun's parser off the study's options (--num is a prefix of its --numa-binding)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "runtime", "--", *args, "--out", str(tmp_path / "two")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("| whiten + INT8 |") == 3                # its 3 tables, printed by rank 0 alone
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert sorted((r["ratio"], r["variant"], r["int8"]) for r in two) == [
        (0.0, "dense", False), (0.5, "plain", False), (0.5, "whiten", False), (0.5, "whiten", True),
        (0.6, "plain", False), (0.6, "whiten", False), (0.6, "whiten", True)]
    assert two == one                                                 # same rows, same order

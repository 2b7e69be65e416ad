"""python -m export --compressed DIR --out DIR [--opset 17] [--no-int8] [--no-fp16] [--modelopt] [--calib DIR --num-parity N]"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from calibration_data import CalibrationDataError
from cliutil import OneLineParser, reserve_output, run_cli

from .errors import ExportError, ParityError
from .pipeline import ExportOptions, export_compressed


def get_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m export",
        description="Export a compressed model directory (and its dense original) to ONNX: fp32, "
                    "INT8 QDQ and FP16 files, each checked against PyTorch on real images.")
    p.add_argument("--compressed", required=True, help="output directory of `python -m compress`")
    p.add_argument("--out", required=True, help="folder for the .onnx files and export_report.json "
                                                "(replaced as a whole, atomically)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17; default 17)")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip the INT8 QDQ files")
    p.add_argument("--no-fp16", dest="fp16", action="store_false", help="skip the FP16 files")
    p.add_argument("--modelopt", action="store_true",
                   help="also write dense.modelopt-int8.onnx, NVIDIA ModelOpt's INT8 PTQ of dense.onnx on the "
                        "compress calibration images: the peer baseline (needs the extra: "
                        "pip install 'vit-edge[modelopt]')")
    p.add_argument("--calib", default=None,
                   help="image folder for the parity checks (default: the model's bundled calibration set)")
    p.add_argument("--num-parity", type=int, default=64, help="images per parity check (default 64)")
    p.add_argument("--threads", type=int, default=1,
                   help="ONNX Runtime threads for parity runs (speed only: the files do not depend on it)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p


def replace_refusal(out: Path) -> str | None:
    """Why ``out`` may not be replaced by an export (None: empty, or an export already)."""
    if out.is_dir() and (not any(out.iterdir()) or (out / "export_report.json").is_file()
                         or any(out.glob("*.onnx"))):
        return None
    return "exists and is not an export directory; choose a new path (it would be replaced)"


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    def body() -> int:
        with reserve_output(args.out, kind="dir", accepts=replace_refusal):  # before any expensive work
            options = ExportOptions(opset=args.opset, int8=args.int8, fp16=args.fp16, calib=args.calib,
                                    num_parity=args.num_parity, threads=args.threads, modelopt=args.modelopt)
            report = export_compressed(args.compressed, args.out, options)
        for name, f in report["files"].items():
            p = f["parity"]
            a = p.get("accuracy")
            check = (f"rel. L2 to float {a['file_error']:.4f} (fake-quant {a['fake_quant_error']:.4f})" if a else
                     f"max|d| {p['max_abs']:.2e}  " + (f"top-1 {p['top1_agreement']:.1%}" if p["top1_agreement"] is not None
                                                       else f"features cos >= {p['cosine_min']:.4f}"))
            print(f"{name:24s} {f['bytes'] / 1e6:8.2f} MB  pairs {f['lowrank_pairs']:3d}  {check}")
        print(f"wrote {len(report['files'])} ONNX files and export_report.json to {args.out}")
        return 0

    return run_cli(body, (ExportError, CalibrationDataError), prefix="export: ",
                   code_of=lambda e: 1 if isinstance(e, ParityError) else 2)


if __name__ == "__main__":
    sys.exit(main())

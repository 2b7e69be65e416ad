"""python -m export --compressed DIR --out DIR [--opset 17] [--no-int8] [--no-fp16] [--calib DIR --num-parity N]"""
from __future__ import annotations

import argparse
import logging
import sys


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a compressed model directory (and its dense original) to ONNX: fp32, "
                    "INT8 QDQ and FP16 files, each checked against PyTorch on real images.")
    p.add_argument("--compressed", required=True, help="output directory of `python -m compress`")
    p.add_argument("--out", required=True, help="folder for the .onnx files and export_report.json")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17; default 17)")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip the INT8 QDQ files")
    p.add_argument("--no-fp16", dest="fp16", action="store_false", help="skip the FP16 files")
    p.add_argument("--calib", default=None,
                   help="image folder for the parity checks (default: the model's bundled calibration set)")
    p.add_argument("--num-parity", type=int, default=64, help="images per parity check (default 64)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads for parity runs")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from .errors import ExportError, ParityError
    from .pipeline import ExportOptions, export_compressed

    try:
        options = ExportOptions(opset=args.opset, int8=args.int8, fp16=args.fp16, calib=args.calib,
                                num_parity=args.num_parity, threads=args.threads)
        report = export_compressed(args.compressed, args.out, options)
    except ParityError as e:
        print(f"export: {e}", file=sys.stderr)
        return 1
    except ExportError as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    for name, f in report["files"].items():
        p = f["parity"]
        print(f"{name:18s} {f['bytes'] / 1e6:8.2f} MB  pairs {f['lowrank_pairs']:3d}  "
              f"max|d| {p['max_abs']:.2e}  top-1 {p['top1_agreement']:.1%}")
    print(f"wrote {len(report['files'])} ONNX files and export_report.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

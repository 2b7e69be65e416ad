"""python -m runtime bench | engine | eval | report | sweep | fit | profile | study | info

bench   latency and memory of an export directory's variants, interleaved (bench.json/.md/.png)
engine  build TensorRT engines from an export directory (runtime.engine)
eval    accuracy of the compressed model and its ONNX files (runtime.evaluate)
report  one report.md for a run directory: compress + export + bench + eval (runtime.workflows.report)
sweep   many budgets from one factorisation: accuracy vs parameters/bytes/latency (runtime.workflows.sweep)
fit     search the budget that meets a target latency or INT8 file size (runtime.workflows.fit)
study   every compress step on/off at equal budgets on real labelled images (runtime.workflows.study)
profile where the time goes per variant: Linears vs attention vs the rest (runtime.profile)
memory-options  what a session's RSS is made of per ORT option set (runtime.memory_options)
latency-table  per-layer dense/pair latencies on this backend, cached for compress (runtime.latency_table)
trt-check  on a GPU with TensorRT: INT8 kernels per MatMul, parity with ORT, batch 1/32 (runtime.trt_check)
info    which backends can run here, and the machine

User errors print one line on stderr and exit with code 2 (argparse's too), filesystem errors
exit 1, Ctrl-C 130; every --out is validated and locked before the work starts.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys

from cliutil import OneLineParser, option_value, reserve_output, run_cli
from runtime.backends import available_backends, thread_options
from runtime.benchmark import BenchConfig, run_benchmark
from runtime.errors import RuntimeStageError
from runtime.machine import describe_machine, machine_info
from runtime.report import render_markdown, write_outputs

# Subcommands that live in their own module (imported only when run): name -> (module, help).
DELEGATED = {
    "engine": ("runtime.engine", "build TensorRT engines from an export directory"),
    "eval": ("runtime.evaluate", "accuracy of the compressed model and its ONNX files"),
    "report": ("runtime.workflows.report", "one report.md for a run directory (compress, export, bench, eval)"),
    "sweep": ("runtime.workflows.sweep", "many budgets, one factorisation: the accuracy/size/latency Pareto curve"),
    "fit": ("runtime.workflows.fit", "the least compression that meets a target latency or INT8 file size"),
    "profile": ("runtime.profile", "ONNX Runtime per-node profile: time in Linears vs attention vs the rest"),
    "study": ("runtime.workflows.study", "methods x allocations x compensation at equal budgets, on real labelled images"),
    "latency-table": ("runtime.latency_table", "per-layer dense vs low-rank pair latency table for compress "
                                               "(--latency-table / --target-latency-ms)"),
    "memory-options": ("runtime.memory_options", "peak-RSS delta by part (weights, load, run) per ONNX Runtime "
                                                 "option set, with its latency cost"),
    "trt-check": ("runtime.trt_check", "TensorRT INT8 proof: per-layer precision, parity with ORT, batch 1/32 latency"),
}
# Subcommands whose --out is one file (the others write into an --out folder).
FILE_OUTPUTS = {"eval", "latency-table"}
# Other packages' user-error types, recognised if already imported by the command that raised.
_USER_ERRORS = (("calibration_data.errors", "CalibrationDataError"), ("compress.errors", "CompressError"),
                ("export.errors", "ExportError"))


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency/memory of dense vs low-rank variants, interleaved",
                       description="Benchmark the variants of an export directory (dense.onnx, dense.int8.onnx, "
                                   "model.onnx, model.int8.onnx, ModelOpt's dense.modelopt-int8.onnx; *.fp16.onnx "
                                   "on GPU backends, the TensorRT *.int8-fp16.onnx on trt) side by side.")
    p.add_argument("--onnx-dir", required=True, help="export directory (python -m export --out)")
    p.add_argument("--backend", default="ort", help="ort | ort-cuda | trt (default: ort)")
    p.add_argument("--engine-dir", default=None,
                   help="trt: prebuilt engines from `python -m runtime engine` (dense.fp16.engine ...) "
                        "instead of building from the ONNX files")
    p.add_argument("--batch-sizes", type=_int_list, default=(1, 8, 32), help="comma-separated (default: 1,8,32)")
    p.add_argument("--threads", type=int, default=None,
                   help="onnxruntime intra-op threads (default: onnxruntime's choice, one per core)")
    p.add_argument("--inter-op-threads", type=int, default=None, help="onnxruntime inter-op threads")
    p.add_argument("--opt-level", choices=("disable", "basic", "extended", "all"), default=None,
                   help="onnxruntime graph optimization level (default: all)")
    p.add_argument("--io-binding", action="store_true", help="onnxruntime: run through IO binding")
    p.add_argument("--no-spin", action="store_true",
                   help="onnxruntime: idle threads sleep instead of spinning (fairer on a machine busy with other jobs)")
    p.add_argument("--option", type=option_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra backend option passed to open_backend (repeatable)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per variant and batch size (default: 5)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per variant and batch size (default: 30)")
    p.add_argument("--variants", type=lambda s: tuple(t for t in s.split(",") if t), default=None,
                   help="comma-separated subset, e.g. dense-fp32,lowrank-fp32 (default: all present)")
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None,
                   help="include the fp16 files (default: only on GPU backends)")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process RSS measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory for bench.json, bench.md, bench.png")


def get_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m runtime", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_bench(sub)
    for name, (module, help_text) in DELEGATED.items():
        # Arguments belong to the module; they are parsed after it is imported (see main).
        sub.add_parser(name, help=help_text, add_help=False)
    info = sub.add_parser("info", help="available backends and the machine")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _bench_options(args) -> dict:
    options = thread_options(args.backend, args.threads)
    if args.inter_op_threads is not None:
        options["inter_op_threads"] = args.inter_op_threads
    if args.opt_level is not None:
        options["optimization"] = args.opt_level
    if args.io_binding:
        options["io_binding"] = True
    if args.no_spin:
        options["allow_spinning"] = False
    options.update(dict(args.option))
    return options


def _bench(args) -> int:
    config = BenchConfig(backend=args.backend, batch_sizes=tuple(args.batch_sizes), warmup=args.warmup,
                         repeats=args.repeats, options=_bench_options(args), include_fp16=args.fp16,
                         variants=args.variants, memory=not args.no_memory, seed=args.seed,
                         engine_dir=args.engine_dir)
    result = run_benchmark(args.onnx_dir, config)
    paths = write_outputs(result, args.out)
    print(render_markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _info(args) -> int:
    backends, machine = available_backends(), machine_info()
    if args.json:
        print(json.dumps({"backends": backends, "machine": machine}, indent=2))
        return 0
    for kind, reason in backends.items():
        print(f"{kind:9s} {'available' if reason is None else 'unavailable: ' + reason}")
    print(f"machine   {describe_machine(machine)}")
    return 0


def _delegate(name: str, argv: list[str]) -> int:
    module_name, help_text = DELEGATED[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise RuntimeStageError(f"`{name}` is not available in this installation ({module_name} is missing)") from None
    parser = OneLineParser(prog=f"python -m runtime {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    with _reserved(name, args):
        return module.main(args)


def _reserved(command: str, args):
    """The subcommand's --out, validated and locked before its work (a no-op without one)."""
    if getattr(args, "out", None) is None or int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 writes
        return contextlib.nullcontext()
    return reserve_output(args.out, kind="file" if command in FILE_OUTPUTS else "dir")


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, RuntimeStageError):
        return True
    for module_name, cls_name in _USER_ERRORS:
        cls = getattr(sys.modules.get(module_name), cls_name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = get_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command not in DELEGATED and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    def body() -> int:
        if args.command in DELEGATED:
            return int(_delegate(args.command, rest) or 0)
        with _reserved(args.command, args):
            return {"bench": _bench, "info": _info}[args.command](args)

    return run_cli(body, is_user_error=_is_user_error)


if __name__ == "__main__":
    sys.exit(main())

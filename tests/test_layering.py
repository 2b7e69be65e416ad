"""The stages' layering, checked on the source: every package uses another only through its public
API (names in its ``__all__``), nothing imports a ``__main__``, and no import runs back up the spine
calibration_data -> compress -> export -> runtime (cliutil below them all); imports sit at module top
except heavy optional frameworks."""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"cliutil": 0, "calibration_data": 1, "compress": 2, "export": 3, "runtime": 4}


def _imports():
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    yield path, node.lineno, node.module, [a.name for a in node.names]
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        yield path, node.lineno, a.name, None


CASES = list(_imports())


def test_nothing_imports_a_main_module():
    bad = [f"{p.relative_to(ROOT)}:{n} {m}" for p, n, m, names in CASES
           if m.endswith("__main__") or (names and "__main__" in names)]
    assert not bad


def test_other_packages_only_through_their_public_api():
    bad = []
    for path, line, module, names in CASES:
        own, top = path.relative_to(ROOT).parts[0], module.split(".")[0]
        if top not in LAYERS or top == own:
            continue
        where = f"{path.relative_to(ROOT)}:{line}"
        if module != top:
            bad.append(f"{where} imports {module} (use `from {top} import ...`)")
        elif names:
            public = set(importlib.import_module(top).__all__)
            bad += [f"{where} imports {top}.{n}, not in {top}.__all__" for n in names if n not in public]
    assert not bad, "\n".join(bad)


def test_no_import_runs_back_up_the_stages():
    bad = [f"{p.relative_to(ROOT)}:{n} imports {m}" for p, n, m, _ in CASES
           if m.split(".")[0] in LAYERS and LAYERS[m.split(".")[0]] > LAYERS[p.relative_to(ROOT).parts[0]]]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("pkg", sorted(LAYERS))
def test_every_public_name_exists(pkg):
    m = importlib.import_module(pkg)
    assert [n for n in getattr(m, "__all__", ()) if not hasattr(m, n)] == []


# Imports live at module top. Inside functions only: heavy optional frameworks, anywhere...
LAZY_ANYWHERE = {"tensorrt", "cuda", "pynvml", "matplotlib", "modelopt", "transformers",
                 "resource"}  # resource: Unix only
# ...and, in what runtime's device side imports (no torch there; onnx/onnxruntime load on use:
# tests/runtime/test_cli.py), these frameworks and the modules of ours that would bring them.
DEVICE_ENTRY_POINTS = ["runtime.__main__", "runtime.backends.ort", "runtime.backends.trt", "runtime.engine",
                       "runtime.trt_check", "export"]
LAZY_ON_DEVICE_SIDE = {"torch", "onnx", "onnxruntime", "onnx_graphsurgeon", "polygraphy"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _function_level_imports():
    """(path, line, [absolute names the import may load]) of every import inside a function."""
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = _module_name(path)
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]

            def walk(node, in_function):
                for child in ast.iter_child_nodes(node):
                    if in_function and isinstance(child, ast.Import):
                        yield path, child.lineno, [a.name for a in child.names]
                    elif in_function and isinstance(child, ast.ImportFrom):
                        base = ".".join(package.split(".")[:len(package.split(".")) - child.level + 1]) \
                            if child.level else ""
                        module = ".".join(p for p in (base, child.module) if p)
                        yield path, child.lineno, [module] + [f"{module}.{a.name}" for a in child.names]
                    yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

            yield from walk(ast.parse(path.read_text()), False)


def _device_side_modules() -> set[str]:
    code = (f"import importlib, sys\nfor m in {DEVICE_ENTRY_POINTS!r}: importlib.import_module(m)\n"
            f"print(' '.join(m for m in sys.modules if m.split('.')[0] in {sorted(LAYERS)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


def test_imports_are_at_module_top_except_heavy_optional_frameworks():
    ours = {_module_name(p) for pkg in LAYERS for p in (ROOT / pkg).rglob("*.py")}
    device_side = _device_side_modules()
    bad = []
    for path, line, targets in _function_level_imports():
        top = targets[0].split(".")[0]
        if top in LAZY_ANYWHERE:
            continue
        if _module_name(path) in device_side:
            loads_ours = [t for t in targets if t in ours]
            if top in LAZY_ON_DEVICE_SIDE or (loads_ours and not set(loads_ours) <= device_side):
                continue
        shown = next((t for t in reversed(targets) if t in ours), targets[0])
        bad.append(f"{path.relative_to(ROOT)}:{line} imports {shown} inside a function")
    assert not bad, "\n".join(bad)

"""The stages' layering, checked on the source: every package uses another only through its public
API (names in its ``__all__``), nothing imports a ``__main__``, and no import runs back up the spine
calibration_data -> compress -> export -> runtime (cliutil below them all)."""
from __future__ import annotations

import ast
import importlib
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

"""Benchmarks (installed as fastvl.bench). ``fastvl bench`` runs every suite listed in SUITES.

A suite is a module here with ``run(device: str, quick: bool) -> list[dict]``: one row per
(op, case, implementation) with at least the keys ``suite``, ``op``, ``case``, ``impl`` and any of
``fwd_ms``, ``fwd_bwd_ms``, ``gflop``, ``mbytes``, ``tflops``, ``gbps``, ``peak_mb``, ``speedup``, or
``skipped`` (the reason an implementation did not run).
"""
import importlib

import torch

from .common import environment, write_json

SUITES = ("ops", "attention", "compression")
COLUMNS = ("op", "case", "impl", "gflop", "mbytes", "fwd_ms", "fwd_bwd_ms", "tflops", "gbps", "peak_mb", "speedup", "skipped")


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def print_table(rows):
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def run(quick=False, out=None, suites=SUITES):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment(device)
    print(f"fastvl bench on {env['device']} (commit {env['commit']}, torch {env['torch']})")
    rows = []
    for name in suites:
        suite = importlib.import_module(f"{__name__}.{name}")
        found = suite.run(device, quick)
        print(f"\n[{name}]")
        print_table(found)
        rows += found
    if out:
        write_json(out, {"environment": env, "rows": rows})
        print(f"\nwrote {out}")
    return 0

"""Benchmarks (installed as fastvl.bench): ``fastvl bench [--suite NAME[,NAME]] [--list] [--quick] [--out DIR]``.

A suite is a module here with ``SUITE`` (its name), ``TITLE`` (what it times), ``COLUMNS`` ((row key, header)
of its table), ``IMPLS`` (a ``common.Registry`` of its implementations: one ``register`` line adds a row),
``run(device, quick, only=None) -> rows`` and ``plot(rows, path)``, and optionally ``summary(rows)`` (lines
comparing its results with their targets). A row holds ``suite``, ``case``, ``impl``, ``device``, ``dtype``
and its measurements, or ``skipped`` (why an implementation did not run). Every suite writes
``<out>/<suite>.json`` and ``<out>/<suite>.png``; ``python -m fastvl.bench.<module>`` runs one suite.
"""
import argparse
import importlib
import os
import sys
import time
import traceback

import torch

from . import common

SUITES = {"ops": "ops", "attention": "attention", "compression": "compression", "model": "model",
          "vit-train": "vit_train", "train": "train"}


def load(name):
    if name not in SUITES:
        raise ValueError(f"--suite: unknown suite {name!r}; expected some of {', '.join(SUITES)}")
    return importlib.import_module(f"{__name__}.{SUITES[name]}")


def timeable(modules, device):
    """One line: which implementations of these suites run on ``device`` and which cannot, with why."""
    ok, not_here = {}, {}
    for module in modules:
        for impl in module.IMPLS.runnable(device):
            ok.setdefault(impl.name, None)
        for name, reason in module.IMPLS.skipped(device).items():
            not_here.setdefault(reason, []).append(name)
    line = f"timed on this {torch.device(device).type}: {', '.join(ok) or 'nothing'}"
    if not_here:
        line += "; not here: " + "; ".join(f"{', '.join(dict.fromkeys(n))} ({r})" for r, n in not_here.items())
    if not common.is_cuda(device):
        line += (". fastvl rows without a backend in their name run the PyTorch reference here (the Triton interpreter "
                 "is no performance number); the native CPU backend runs in the *native rows, and in the model and "
                 "train suites, whose `fastvl ops` column names the backend")
    return line


def report(module, rows, device):
    """The suite's table, what it is, why some implementations did not run, and its target lines."""
    dtype = next((r["dtype"] for r in rows if r.get("dtype")), "-")
    shapes = "real shapes" if common.is_cuda(device) else "shapes scaled down for a CPU"
    print(f"\n[{module.SUITE}] {module.TITLE}")
    print(f"device {common.device_name(device)}, {dtype}, {shapes}; times are the median (min-max) of the timed "
          "calls, warm-up calls excluded, the implementations of a case timed in the same rounds; speedup/ratio "
          "columns are relative to the `vs` column, the median (min-max) of the per-round ratios")
    timed = common.measured(rows)
    print(common.format_table(timed, module.COLUMNS) if timed else "(nothing measured)")
    for r in rows:
        if "skipped" in r:
            print(f"not run: {r['impl']} ({r.get('case', 'all')}): {r['skipped']}")
    for line in getattr(module, "summary", lambda rows: [])(rows):
        print(line)


def save(module, rows, out, env, quick):
    path = os.path.join(out, f"{module.SUITE}.json")
    common.write_json(path, {"environment": env, "suite": module.SUITE, "title": module.TITLE, "quick": quick,
                             "summary": getattr(module, "summary", lambda rows: [])(rows), "rows": rows})
    png = os.path.join(out, f"{module.SUITE}.png")
    drew = module.plot(rows, png)
    print(f"wrote {path}" + (f" and {png}" if drew else " (no plot: matplotlib missing or nothing measured)"))


def run(suites=tuple(SUITES), quick=False, out=None, only=None, device=None):
    """Runs ``suites`` (names or modules), prints their tables and writes their JSON and plots to ``out``
    (default ``./fastvl-bench-results/<timestamp>``). Exit status 1 when a suite failed as a whole."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    modules = [load(s) if isinstance(s, str) else s for s in suites]
    out = os.path.abspath(out or common.default_out())
    env = common.environment(device)
    print(f"fastvl bench on {env['device']}: commit {env['commit']}, torch {env['torch']}, triton {env['triton']}, "
          f"transformers {env['transformers']}{', quick' if quick else ''}; results in {out}")
    print(timeable(modules, device))
    os.makedirs(out, exist_ok=True)
    status = 0
    for module in modules:
        common.PARTIAL = os.path.join(out, f"{module.SUITE}.rows.jsonl")  # rows as they come, if the suite dies
        if os.path.exists(common.PARTIAL):
            os.remove(common.PARTIAL)
        start = time.perf_counter()
        try:
            rows = module.run(device, quick, only)
        except Exception:  # noqa: BLE001 - the other suites still run
            traceback.print_exc()
            print(f"[{module.SUITE}] failed")
            status = 1
            continue
        finally:
            common.PARTIAL = None
        report(module, rows, device)
        save(module, rows, out, {**env, "seconds": round(time.perf_counter() - start, 1)}, quick)
        partial = os.path.join(out, f"{module.SUITE}.rows.jsonl")
        if os.path.exists(partial):
            os.remove(partial)
    return status


def add_arguments(parser, suites=True):
    if suites:
        parser.add_argument("--suite", default=",".join(SUITES),
                            help=f"comma-separated suites (default: all of {', '.join(SUITES)})")
        parser.add_argument("--list", action="store_true", help="list the suites and their implementations, then exit")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: a smoke run of seconds")
    parser.add_argument("--out", help="results folder (default: ./fastvl-bench-results/<timestamp>)")
    parser.add_argument("--case", help="regular expression: only the cases whose name matches")


def list_suites(names, device):
    for name in names:
        module = load(name)
        impls = ", ".join(i.name for i in module.IMPLS)
        print(f"{name}: {module.TITLE}\n    implementations: {impls}")
    print(timeable([load(n) for n in names], device))
    return 0


def main(args):
    """``fastvl bench`` with parsed ``args`` (see add_arguments)."""
    try:
        names = [s.strip() for s in args.suite.split(",") if s.strip()]
        for name in names:
            load(name)
    except ValueError as exc:
        print(f"fastvl bench: {exc}", file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.list:
        return list_suites(names, device)
    return run(names, args.quick, args.out, args.case)


def suite_main(module, argv=None):
    """``python -m fastvl.bench.<suite> [--quick] [--out DIR] [--case REGEX]``."""
    parser = argparse.ArgumentParser(prog=f"python -m {module.__spec__.name}", description=module.TITLE)
    add_arguments(parser, suites=False)
    args = parser.parse_args(argv)
    return run([module], args.quick, args.out, args.case)

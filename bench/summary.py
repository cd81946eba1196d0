"""One page from a results folder: each step of a run, each target beside its measured ratio, each suite's table.

``python -m fastvl.bench.summary DIR`` reads DIR/<suite>.json (or, for a suite that was cut short, the rows it
had emitted, DIR/<suite>.rows.jsonl), DIR/steps.tsv when a script wrote one (name, exit status, seconds,
budget) and DIR/pytest.log, and writes DIR/summary.md (also printed).
"""
import argparse
import json
import os
import sys

from . import SUITES, common, load


def suite_rows(folder, name):
    """(rows, complete) of a suite in ``folder``; ([], False) when it left nothing."""
    path = os.path.join(folder, f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            payload = json.load(f)
        return payload["rows"], True
    partial = os.path.join(folder, f"{name}.rows.jsonl")
    if os.path.exists(partial):
        with open(partial) as f:
            return [json.loads(line) for line in f if line.strip()], False
    return [], False


def _steps(folder):
    path = os.path.join(folder, "steps.tsv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def _pytest_tail(folder):
    path = os.path.join(folder, "pytest.log")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    return next((line for line in reversed(lines) if " passed" in line or " failed" in line or " skipped" in line
                 or "no tests ran" in line), lines[-1] if lines else None)


def render(folder):
    out = []
    env = None
    for name in SUITES:
        path = os.path.join(folder, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                env = json.load(f)["environment"]
            break
    cpu = env is not None and env["device"].startswith("cpu")
    out.append("# fastvl check on a CPU" if cpu else "# fastvl GPU check")
    if env:
        out.append(f"{env['device']}; commit {env['commit']}; torch {env['torch']}, triton {env['triton']}, "
                   f"transformers {env['transformers']}; {env['date']}")
    steps = _steps(folder)
    if steps:
        out += ["", "## Steps", "", "| step | status | seconds | budget |", "| --- | --- | --- | --- |"]
        for name, rc, seconds, budget_s in steps:
            status = {"0": "ok", "124": "TIMED OUT", "137": "KILLED", "skipped": "SKIPPED (deadline)"}.get(rc, f"FAILED (exit {rc})")
            out.append(f"| {name} | {status} | {seconds} | {budget_s} |")
    tail = _pytest_tail(folder)
    if tail:
        out += ["", f"pytest -m gpu: {tail}"]
    out += ["", "## Targets (measured ratio beside each target)", ""]
    if cpu:
        out += ["A CPU run on scaled-down shapes (fastvl's ops on the native CPU backend or the reference, as each "
                "table says), so the GPU targets below are not measured by it.", ""]
    tables = []
    for name in SUITES:
        rows, complete = suite_rows(folder, name)
        if not rows:
            out.append(f"- {name}: no results")
            continue
        module = load(name)
        note = "" if complete else " (cut short: the rows measured before it stopped)"
        lines = module.summary(rows) if hasattr(module, "summary") else []
        out += [f"- {line}{note}" for line in lines] or [f"- {name}: no target measured here{note}"]
        timed = common.measured(rows)
        if timed:
            tables += ["", f"### {name}{note}", "", "```", common.format_table(timed, module.COLUMNS), "```"]
    out += ["", "## Tables"] + tables
    return "\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastvl.bench.summary", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a results folder (fastvl bench --out, scripts/gpu-check.sh)")
    args = parser.parse_args(argv)
    text = render(args.folder)
    with open(os.path.join(args.folder, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

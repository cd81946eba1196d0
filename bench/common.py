"""What every suite shares: timing with spread, implementation registries, readable tables, progress, output.

Timing is written here rather than taken from ``torch.utils.benchmark``: its blocked measurements average
several calls per sample, while a table here shows per-call spread (min-max and IQR), times the implementations
of a case in interleaved rounds (so that their ratios hold on a loaded machine), needs an untimed ``setup``
before each call (a fresh KV cache per decode run) and times CUDA with events.
"""
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch


# ------------------------------------------------------------------ device and environment
def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def device_name(device) -> str:
    if is_cuda(device):
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def bench_dtype(device):
    """bf16 on a GPU; fp32 on a CPU (the CPU runs scaled-down shapes, labelled so)."""
    return torch.bfloat16 if is_cuda(device) else torch.float32


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def default_backend(device) -> str:
    """The fastvl backend a suite runs its ops on unless a row names one: the Triton kernels on a GPU, the
    reference on a CPU (never the Triton interpreter, even with TRITON_INTERPRET=1)."""
    return "triton" if is_cuda(device) else "reference"


def user_backend(device) -> str:
    """The backend a user's whole model runs on automatically (the interpreter aside): the Triton kernels on a
    GPU, the native CPU kernels on a CPU where fastvl._C is built, else the reference. Suites without per-backend
    rows (model, train) time this one."""
    return "triton" if is_cuda(device) else "native" if NATIVE_ONLY(device) is None else "reference"


def commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(package):
    """An installed package's version without importing it (transformers takes seconds to import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment(device) -> dict:
    return {
        "device": device_name(device), "commit": commit(), "torch": torch.__version__, "triton": _version("triton"),
        "transformers": _version("transformers"), "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# ------------------------------------------------------------------ timing
@dataclass(frozen=True)
class Budget:
    """How long to time the call sites of one case: ``warmup`` untimed calls of each after its first (compile,
    autotune, allocator growth), then at least ``repeat`` rounds of timed calls, more until the rounds have taken
    ``min_time_s`` per call site, at most ``max_repeat``."""

    warmup: int
    repeat: int
    min_time_s: float = 0.0
    max_repeat: int = 100


def budget(device, quick) -> Budget:
    if quick:
        return Budget(warmup=1, repeat=3)
    if is_cuda(device):
        return Budget(warmup=5, repeat=10, min_time_s=0.3, max_repeat=200)
    return Budget(warmup=2, repeat=5, min_time_s=0.5, max_repeat=50)


@dataclass(frozen=True)
class Timing:
    """Per-call wall times in ms of one call site, the i-th from round i of its ``measure_group``."""

    times: tuple

    @property
    def median(self):
        return statistics.median(self.times)

    def row(self, key) -> dict:
        """{key: median, key_min, key_max, key_iqr, key_n, key_times}: the median, the spread and the times of the
        timed calls (``key_times`` pairs them by round with the other call sites of the case: see ``ratio``)."""
        q = statistics.quantiles(self.times, n=4, method="inclusive") if len(self.times) > 1 else [self.times[0]] * 3
        return {key: self.median, f"{key}_min": min(self.times), f"{key}_max": max(self.times),
                f"{key}_iqr": q[2] - q[0], f"{key}_n": len(self.times), f"{key}_times": list(self.times)}


def _sync(device):
    if is_cuda(device):
        torch.cuda.synchronize(device)


def measure_group(fns, device, plan: Budget, setup=None) -> dict:
    """Times every ``fn()`` of ``fns`` ({key: fn}; ``fn(setup())`` when ``setup`` is given, setup never timed) per
    ``plan``, in rounds that call each fn once in turn: {key: Timing}.

    Interleaved, a change of the machine's load between rounds reaches every fn alike, so the ratio of two
    fns' times in one round holds (timed one after the other, each fn would see another load). The first call
    of each fn and ``plan.warmup`` more are never timed, so compilation, autotuning and first allocations cannot
    reach a median; CUDA calls are timed with events, CPU calls with perf_counter.
    """
    def call(fn, timed):
        arg = (setup(),) if setup else ()
        _sync(device)
        if not timed:
            fn(*arg)
            return None
        if is_cuda(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*arg)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn(*arg)
        return (time.perf_counter() - t0) * 1e3

    for _ in range(1 + plan.warmup):
        for fn in fns.values():
            call(fn, False)
    times = {key: [] for key in fns}
    rounds, total_ms = 0, 0.0
    while rounds < plan.max_repeat and (rounds < plan.repeat or total_ms < plan.min_time_s * 1e3 * len(fns)):
        for key, fn in fns.items():
            times[key].append(call(fn, True))
            total_ms += times[key][-1]
        rounds += 1
    return {key: Timing(tuple(t)) for key, t in times.items()}


def measure(fn, device, plan: Budget, setup=None) -> Timing:
    """``measure_group`` of one call site."""
    return measure_group({"fn": fn}, device, plan, setup)["fn"]


def measure_rows(steps, device, plan: Budget) -> dict:
    """{impl: {key: fn}} -> {impl: the ``Timing.row(key)`` of every key}: all call sites of a case in the same
    rounds of one ``measure_group``."""
    timings = measure_group({(impl, key): fn for impl, fns in steps.items() for key, fn in fns.items()}, device, plan)
    return {impl: {k: v for key in fns for k, v in timings[impl, key].row(key).items()} for impl, fns in steps.items()}


def ratio(base, row, key, name) -> dict:
    """{name, name_min, name_max}: the median and range of the per-round ratios ``base[key] / row[key]`` of two
    rows timed in the same rounds (``measure_rows``): each ratio is of two calls under the same load."""
    ratios = [b / t for b, t in zip(base[f"{key}_times"], row[f"{key}_times"], strict=True)]
    return {name: statistics.median(ratios), f"{name}_min": min(ratios), f"{name}_max": max(ratios)}


def peak_memory_mb(fn, device):
    """Peak device memory allocated while ``fn()`` runs above what was allocated before, in MiB. None on a CPU."""
    if not is_cuda(device):
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


# ------------------------------------------------------------------ implementations
def needs_cuda(what):
    return lambda device: None if is_cuda(device) else f"{what}: CUDA only"


def needs_module(module, what):
    import importlib.util

    def check(device):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
        return needs_cuda(what)(device)
    return check


TRITON_ONLY = needs_cuda("Triton kernels (the interpreter is no performance number)")


def NATIVE_ONLY(device):
    """Why the native CPU backend cannot run on ``device``, or None."""
    from fastvl import _native

    if torch.device(device).type != "cpu":
        return "native CPU backend: CPU tensors only"
    return None if _native.available() else f"fastvl._C is not built ({_native.ERROR})"


@dataclass
class Impl:
    """One implementation row of a suite. ``fn``'s signature is the suite's (None: the suite's fastvl path);
    ``backend``: the fastvl backend it runs under; ``unavailable(device)``: why it cannot run there, or None."""

    name: str
    fn: object = None
    backend: str | None = None
    unavailable: object = field(default=lambda device: None)


class Registry(list):
    """The implementations of a suite, in table order. Adding a row is one line::

        fastvl.bench.attention.IMPLS.register("native", my_fn, backend="native", unavailable=reason_or_none)
    """

    def register(self, name, fn=None, *, backend=None, unavailable=None, first=False) -> Impl:
        impl = Impl(name, fn, backend, unavailable or (lambda device: None))
        self[:] = [i for i in self if i.name != name]
        self.insert(0, impl) if first else self.append(impl)
        return impl

    def runnable(self, device):
        return [impl for impl in self if impl.unavailable(torch.device(device)) is None]

    def skipped(self, device) -> dict:
        return {impl.name: r for impl in self if (r := impl.unavailable(torch.device(device))) is not None}


def skipped_rows(registry, device, common):
    """One row (``common`` + impl and reason) per implementation of ``registry`` that cannot run on ``device``."""
    return [{**common, "case": "all", "impl": name, "skipped": reason}
            for name, reason in registry.skipped(device).items()]


def failed_row(common, impl, exc):
    return {**common, "impl": impl, "skipped": f"failed: {type(exc).__name__}: {exc}"[:300]}


def measured(rows):
    """The rows of implementations that ran (skipped ones carry a ``skipped`` reason)."""
    return [r for r in rows if "skipped" not in r]


def speedups(rows, baseline, key, group="case", name="speedup"):
    """Adds ``vs`` (the baseline's name) and ``name``, ``name_min`` and ``name_max`` (the median and range of the
    per-round ratios baseline ``key`` / row ``key``: see ``ratio``) to every row of a group that holds
    ``baseline`` (an impl name, or a tuple of them: the first present)."""
    names = (baseline,) if isinstance(baseline, str) else baseline
    for g in dict.fromkeys(r[group] for r in rows):
        members = [r for r in rows if r[group] == g]
        base = next((r for n in names for r in members if r["impl"] == n), None)
        for r in members if base else ():
            r.update(vs=base["impl"], **ratio(base, r, key, name))


def target(what, value, target, at_most=False):
    """A line of a suite's summary: ``what`` measured as ``value``x against its target, and whether it is met."""
    met = value <= target if at_most else value >= target
    return f"{what}: {sig3(value)}x (target {'<=' if at_most else '>='} {target}x): {'met' if met else 'NOT MET'}"


def matmul_tflops(device, plan, n=8192):
    """TFLOP/s of an n x n x n matmul in the benchmark dtype, from its fastest timed call: the measured peak that
    efficiencies refer to (a median would count the machine's load against the peak)."""
    a, b = (torch.randn(n, n, device=device, dtype=bench_dtype(device)) for _ in range(2))
    return 2 * n ** 3 / min(measure(lambda: a @ b, device, plan).times) / 1e9


# ------------------------------------------------------------------ readable output
def sig3(value) -> str:
    """3 significant digits, never scientific notation: 2050, 75.6, 0.00123."""
    if value == 0 or not math.isfinite(value):
        return str(0 if value == 0 else value)
    digits = 2 - math.floor(math.log10(abs(value)))
    rounded = round(value, digits)
    return f"{rounded:.{max(digits, 0)}f}"


def fmt_time(ms, spread=None) -> str:
    """``ms`` in µs below 1 ms, else in ms; ``spread`` (min, max) in the same unit."""
    scale, unit = (1e3, "µs") if ms < 1 else (1, "ms")
    text = f"{sig3(ms * scale)} {unit}"
    return text + (f" ({sig3(spread[0] * scale)}-{sig3(spread[1] * scale)})" if spread else "")


def cell(row, key) -> str:
    """A table cell by the key's convention: ``*_ms`` a time with its min-max, ``*speedup*``/``*_ratio`` a
    ratio with its min-max where it has one, ``rel_err`` an error, other floats 3 significant digits."""
    value = row.get(key)
    if value is None:
        return "-"
    if key.endswith("_ms"):
        spread = (row[f"{key}_min"], row[f"{key}_max"]) if row.get(f"{key}_n", 1) > 1 else None
        return fmt_time(value, spread)
    if "speedup" in key or key.endswith("_ratio"):
        low, high = row.get(f"{key}_min", value), row.get(f"{key}_max", value)
        return f"{sig3(value)}x" + (f" ({sig3(low)}-{sig3(high)})" if low != high else "")
    if key == "rel_err":
        return f"{value:.1e}"
    if isinstance(value, float):
        return sig3(value)
    return str(value)


def format_table(rows, columns) -> str:
    """``columns``: (row key, header) pairs; columns no row has are left out."""
    columns = [(k, h) for k, h in columns if any(r.get(k) is not None for r in rows)]
    cells = [[cell(r, k) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (_, h), w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def progress(items, desc):
    """A tqdm progress line over ``items`` (stderr), refreshed at least every second."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, file=sys.stderr, mininterval=1.0, dynamic_ncols=True, leave=False)


PARTIAL = None  # set by the runner: every emitted row is appended here as a JSON line


def emit(bar, row, summary):
    """Shows a measured row as soon as it exists (above the progress line) and records it in PARTIAL."""
    text = f"  {row.get('case', '')} | {row.get('impl', '')}: {summary}"
    bar.write(text, file=sys.stderr) if bar is not None else print(text, file=sys.stderr)
    if PARTIAL:
        with open(PARTIAL, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


# ------------------------------------------------------------------ results
def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def default_out():
    """./fastvl-bench-results/<timestamp>/ in the current directory (never inside the package)."""
    return os.path.join(os.getcwd(), "fastvl-bench-results", time.strftime("%Y%m%d-%H%M%S"))


def write_json(path, payload):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)


def bar_plot(rows, path, panels, ylabel, title, log=False, group="case"):
    """Grouped bars per ``group`` and implementation, one panel per (row key, panel title); False without
    matplotlib or without rows."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not rows:
        return False
    groups = list(dict.fromkeys(r[group] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / len(impls)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.7 * len(groups)), 4.5 * len(panels)), squeeze=False)
    for ax, (key, panel) in zip(axes[:, 0], panels):
        for i, impl in enumerate(impls):
            values = [next((r.get(key) or 0.0 for r in rows if r[group] == g and r["impl"] == impl), 0.0)
                      for g in groups]
            ax.bar([x + i * width for x in range(len(groups))], values, width, label=impl)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel if isinstance(ylabel, str) else ylabel[key])
        ax.set_title(f"{title}, {panel} ({rows[0]['device']}, {rows[0]['dtype']})", fontsize=9)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))])
        ax.set_xticklabels([g.replace(", ", "\n") for g in groups], fontsize=7)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

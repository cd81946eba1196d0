"""Timing, memory and reporting shared by the benchmarks."""
import json
import os
import platform
import re
import statistics
import subprocess
import time

import torch


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_ms(fn, device, warmup=3, repeat=10) -> float:
    """Median wall time of ``fn()`` in ms (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory_mb(fn, device):
    """Peak device memory allocated while ``fn()`` runs, above what was allocated before (None on CPU)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def environment(device) -> dict:
    return {
        "device": device_name(device), "commit": commit(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_json(path, payload):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def measured(rows):
    """The rows of implementations that ran (skipped ones carry a ``skipped`` reason)."""
    return [r for r in rows if "skipped" not in r]


def bar_plot(rows, path, panels, ylabel, title, log=False):
    """Grouped bars per case and implementation, one panel per (row key, panel title); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    width = 0.8 / len(impls)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.7 * len(cases)), 4.5 * len(panels)), sharex=True)
    for ax, (key, panel) in zip(axes, panels):
        for i, impl in enumerate(impls):
            values = [next((r[key] for r in rows if r["case"] == c and r["impl"] == impl), 0.0) for c in cases]
            ax.bar([x + i * width for x in range(len(cases))], values, width, label=impl)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, {panel} ({rows[0]['device']}, {rows[0]['dtype']})")
    axes[-1].set_xticks([x + 0.4 - width / 2 for x in range(len(cases))])
    axes[-1].set_xticklabels([c.replace(", ", "\n") for c in cases], fontsize=7)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def default_out(device):
    """bench/results/<device>/, e.g. bench/results/nvidia-h100-80gb-hbm3/."""
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", slug(name))


def print_skipped(rows):
    for r in rows:
        if "skipped" in r:
            print(f"skipped {r['impl']} ({r['case']}): {r['skipped']}")


def save_results(out, stem, payload, plot):
    """Write <out>/<stem>.json and, with matplotlib, <out>/<stem>.png (``plot(path)`` returns whether it drew)."""
    path = os.path.join(out, f"{stem}.json")
    write_json(path, payload)
    print(f"wrote {path}")
    png = os.path.join(out, f"{stem}.png")
    print(f"wrote {png}" if plot(png) else "matplotlib is not installed: no plot")

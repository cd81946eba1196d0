"""Benchmark helpers: readable numbers, timing that excludes warm-up, registries, the `vs` column, the CLI."""
import json
import os
import time
from types import SimpleNamespace

import pytest

from fastvl import _native
from fastvl.bench import common, load, run, summary
from fastvl.bench.common import Budget, Registry, fmt_time, measure, measure_group, sig3
from fastvl.cli import main as cli


@pytest.mark.parametrize("value, text", [(2049.7, "2050"), (75.62, "75.6"), (0.0012345, "0.00123"), (123456, "123000"),
                                         (1.0, "1.00"), (0.0, "0"), (-3.14159, "-3.14")])
def test_three_significant_digits_never_scientific(value, text):
    assert sig3(value) == text


def test_times_carry_their_unit_and_spread():
    assert fmt_time(0.8123, (0.79, 0.85)) == "812 µs (790-850)"
    assert fmt_time(75.64) == "75.6 ms"
    row = {"fwd_ms": 2049.0, "fwd_ms_min": 2000.0, "fwd_ms_max": 2110.0, "fwd_ms_n": 5, "speedup": 1.5, "rel_err": 1.2e-7}
    assert [common.cell(row, k) for k in ("fwd_ms", "speedup", "rel_err", "missing")] == [
        "2050 ms (2000-2110)", "1.50x", "1.2e-07", "-"]


def test_first_calls_are_never_timed():
    """A call site slow on its first calls (compilation, autotuning) must not reach the median or the spread."""
    calls = []

    def fn():
        calls.append(None)
        time.sleep(0.05 if len(calls) <= 2 else 0.001)

    timing = measure(fn, "cpu", Budget(warmup=1, repeat=5))
    assert len(calls) == 7 and len(timing.times) == 5
    row = timing.row("x_ms")
    assert row["x_ms_max"] < 30 and row["x_ms_min"] <= row["x_ms"] <= row["x_ms_max"] and row["x_ms_n"] == 5


def test_repeats_until_the_minimum_time_and_setup_is_untimed():
    timing = measure(lambda arg: time.sleep(0.002), "cpu", Budget(0, 2, min_time_s=0.03, max_repeat=1000),
                     setup=lambda: time.sleep(0.2))
    assert sum(timing.times) >= 30 and len(timing.times) >= 2 and timing.median < 100


def test_registry_registration_is_one_line():
    impls = Registry()
    impls.register("a")
    impls.register("b", unavailable=common.needs_cuda("b's kernels"))
    impls.register("first", backend="reference", first=True)
    assert [i.name for i in impls.runnable("cpu")] == ["first", "a"]
    assert impls.skipped("cpu") == {"b": "b's kernels: CUDA only"}
    impls.register("a", backend="triton")  # registering a name again replaces it
    assert [(i.name, i.backend) for i in impls] == [("first", "reference"), ("b", None), ("a", "triton")]


def test_implementations_are_timed_in_interleaved_rounds():
    """After every call site's warm-up, each round calls every one once in turn."""
    calls = []
    timings = measure_group({name: (lambda name=name: calls.append(name)) for name in "abc"}, "cpu",
                            Budget(warmup=1, repeat=4))
    assert calls == list("abc") * 2 + list("abc") * 4
    assert [len(t.times) for t in timings.values()] == [4, 4, 4]


def test_speedups_are_per_round_ratios_that_load_cannot_move(monkeypatch):
    """The machine slows down 5x halfway through: every round sees one load, so the speedup is exact (timed one
    after the other, ``slow`` would see the load its baseline did not, and its speedup would read 10x)."""
    clock = SimpleNamespace(now=0.0, calls=0)
    monkeypatch.setattr(common, "time", SimpleNamespace(perf_counter=lambda: clock.now))

    def work(ms):
        def fn():
            clock.calls += 1
            clock.now += ms * (1 if clock.calls <= 12 else 5) / 1e3
        return fn

    timings = measure_group({"fast": work(1.0), "slow": work(2.0)}, "cpu", Budget(warmup=0, repeat=10))
    rows = [{"case": "c", "impl": name, **t.row("t_ms")} for name, t in timings.items()]
    rows.append({"case": "d", "impl": "fast", **timings["fast"].row("t_ms")})
    common.speedups(rows, "slow", "t_ms")
    fast, slow, alone = rows
    assert fast["vs"] == "slow" and (fast["speedup"], fast["speedup_min"], fast["speedup_max"]) == pytest.approx((2, 2, 2))
    assert slow["speedup"] == pytest.approx(1) and "vs" not in alone
    assert fast["t_ms_max"] == pytest.approx(5 * fast["t_ms_min"])  # the load did change
    assert [common.cell({"speedup": 2.0, "speedup_min": low, "speedup_max": high}, "speedup")
            for low, high in ((1.5, 2.5), (2.0, 2.0))] == ["2.00x (1.50-2.50)", "2.00x"]


def test_cli_lists_suites_and_rejects_unknown_ones(capsys):
    assert cli(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(f"{name}:" in listed for name in ("ops", "attention", "compression", "model", "vit-train", "train"))
    assert "timed on this cpu" in listed and "CUDA only" in listed
    assert cli(["bench", "--suite", "ops,nope"]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err


def test_results_go_to_the_current_directory_not_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert common.default_out().startswith(str(tmp_path / "fastvl-bench-results"))
    assert cli(["bench", "--quick", "--suite", "compression", "--case", "deepstack"]) == 0
    (out,) = (tmp_path / "fastvl-bench-results").iterdir()
    payload = json.loads((out / "compression.json").read_text())
    assert payload["suite"] == "compression" and payload["environment"]["commit"]
    native = {"fastvl-native"} if _native.available() else set()
    assert {r["impl"] for r in common.measured(payload["rows"])} == {"reference", "torch-index-put", "torch-index-add"} | native
    assert (out / "compression.png").exists() and not (out / "compression.rows.jsonl").exists()


def test_summary_page_marks_steps_targets_and_partial_suites(tmp_path):
    (tmp_path / "steps.tsv").write_text("pytest\t0\t40\t120\nmodel\t124\t120\t120\nops\tskipped\t0\t40\n")
    (tmp_path / "pytest.log").write_text("....\n12 passed, 3 skipped in 40.0s\n")
    rows = [{"suite": "vit-train", "case": "c", "impl": "hf-sdpa", "tokens_s": 100.0, "step_ms": 10.0, "peak_mb": 100.0,
             "device": "gpu", "dtype": "bfloat16"},
            {"suite": "vit-train", "case": "c", "impl": "fastvl", "tokens_s": 160.0, "step_ms": 6.25, "peak_mb": 80.0,
             "vs": "hf-sdpa", "speedup": 1.6, "mem_ratio": 0.8, "device": "gpu", "dtype": "bfloat16"}]
    (tmp_path / "vit-train.rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = summary.render(str(tmp_path))
    assert "| model | TIMED OUT | 120 | 120 |" in text and "SKIPPED (deadline)" in text
    assert "12 passed, 3 skipped" in text
    assert "fastvl tokens/s vs hf-sdpa: 1.60x (target >= 1.5x): met (cut short" in text
    assert "fastvl peak memory vs hf-sdpa: 0.800x (target <= 0.7x): NOT MET" in text
    assert "- model: no results" in text and "- train: no results" in text


def test_a_failing_suite_fails_the_run_but_not_the_others(tmp_path, monkeypatch, capsys):
    ops = load("ops")
    monkeypatch.setattr(ops, "run", lambda device, quick, only=None: 1 / 0)
    assert run(["ops", "compression"], quick=True, out=str(tmp_path), only="deepstack") == 1
    assert "[ops] failed" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["compression.json", "compression.png"]

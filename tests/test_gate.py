"""The compile gate: rows per kernel/config/arch, failures on compile errors and missing tensor cores.

Runs in a subprocess: the gate compiles real (not interpreted) kernels, and this test session has
TRITON_INTERPRET=1 set before any kernel is defined.
"""
import os
import subprocess
import sys
import textwrap

import pytest

from fastvl.kernels.registry import Spec, gated, prune_by_arch

SCRIPT = textwrap.dedent('''
    import sys
    import triton
    import triton.language as tl
    from fastvl import gate
    from fastvl.kernels.registry import Spec, gated, signature

    def specs(fn):
        return [Spec("fp16", signature(fn, "fp16"), {})]

    @gated(specs, tensor_cores="wgmma")
    @triton.autotune([triton.Config({"BLOCK": 64}, num_warps=4), triton.Config({"BLOCK": 16}, num_warps=1),
                      triton.Config({"BLOCK": 32, "ARCH": 80}, num_warps=4)], key=[])
    @triton.jit
    def toy_dot(x_ptr, y_ptr, n, BLOCK: tl.constexpr, ARCH: tl.constexpr = 0):
        o = tl.arange(0, BLOCK)
        a = tl.load(x_ptr + o[:, None] * BLOCK + o[None, :])
        tl.store(y_ptr + o[:, None] * BLOCK + o[None, :], tl.dot(a, a).to(tl.float16))

    @gated(lambda fn: [Spec("fp32", signature(fn, "fp32"), {"BLOCK": 48}, {"num_warps": 4})])
    @triton.jit
    def toy_broken(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)  # 48 is no power of two: a compile error

    assert signature(toy_dot.fn, "bf16", n="i64") == {
        "x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i64", "BLOCK": "constexpr", "ARCH": "constexpr"}
    sys.exit(gate.run(sys.argv[1]))
''')


def _gate(tmp_path, pattern):
    script = tmp_path / "toy_kernels.py"  # @triton.jit needs its source in a file
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(script), pattern], capture_output=True, text=True, env=env, timeout=600)


def _rows(stdout, name):
    return [line.split() for line in stdout.splitlines() if line.startswith(name)]


def test_gate_reports_every_config_and_arch(tmp_path):
    result = _gate(tmp_path, "^toy_dot$")
    rows = _rows(result.stdout, "toy_dot")
    # 2 configs x sm80, sm90, and an ARCH=80 config compiled for sm80 only
    assert len(rows) == 5, result.stdout + result.stderr
    by = {(r[2], r[3]): r for r in rows}
    assert ("BLOCK=32,ARCH=80,w4,s3", "sm80") in by
    big, small = "BLOCK=64,w4,s3", "BLOCK=16,w1,s3"
    assert by[big, "sm80"][-2] == "mma" and by[big, "sm80"][-1] == "ok"
    assert by[big, "sm90"][-2] == "wgmma" and by[big, "sm90"][-1] == "ok"
    # one warp cannot issue wgmma: a kernel that registered for it fails the gate there
    assert by[small, "sm90"][-1] == "NO-WGMMA"
    assert int(by[big, "sm90"][4]) > 0  # registers reported
    assert result.returncode == 1
    assert "5 compilations, 1 failures" in result.stdout


def test_gate_fails_on_compile_error(tmp_path):
    result = _gate(tmp_path, "^toy_broken$")
    assert "ERROR" in result.stdout, result.stdout + result.stderr
    assert result.returncode == 1


def test_registry_rejects_unknown_tensor_core_kind():
    with pytest.raises(ValueError, match="tensor_cores"):
        gated(lambda fn: [Spec("x", {}, {})], tensor_cores="tensor")


def test_prune_by_arch_keeps_configs_of_the_device_family():
    import triton

    configs = [triton.Config({"B": 1, "ARCH": 80}), triton.Config({"B": 2, "ARCH": 90}), triton.Config({"B": 3})]
    kept = prune_by_arch(configs, {})
    # without CUDA only the configs for every architecture remain
    assert [c.kwargs["B"] for c in kept] == [3]

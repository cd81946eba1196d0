"""The compile gate and its performance model.

The gate runs in a subprocess: it compiles real (not interpreted) kernels, and this test session has
TRITON_INTERPRET=1 set before any kernel is defined. The performance model is tested on SASS text.
"""
import dataclasses
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

from fastvl import perf
from fastvl.kernels import registry
from fastvl.kernels.registry import Spec, gated, launch_spec, prune_by_arch

SCRIPT = textwrap.dedent('''
    import sys
    import triton
    import triton.language as tl
    from fastvl import gate
    from fastvl.kernels.registry import Spec, gated, signature

    def specs(fn):
        # the second spec pins BLOCK: only the configs that agree compile for it
        return [Spec("fp16", signature(fn, "fp16"), {}, floor=0.1),
                Spec("fp16-b64", signature(fn, "fp16"), {"BLOCK": 64}, floor={80: 0.1, 90: 0.99})]

    @gated(specs, tensor_cores="wgmma")
    @triton.autotune([triton.Config({"BLOCK": 64}, num_warps=4), triton.Config({"BLOCK": 16}, num_warps=1),
                      triton.Config({"BLOCK": 32, "ARCH": 80}, num_warps=4)], key=[])
    @triton.jit
    def toy_dot(x_ptr, y_ptr, n, BLOCK: tl.constexpr, ARCH: tl.constexpr = 0):
        o = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        for i in range(n):  # a hot loop of one dot
            a = tl.load(x_ptr + i * BLOCK * BLOCK + o[:, None] * BLOCK + o[None, :])
            acc = tl.dot(a, a, acc)
        tl.store(y_ptr + o[:, None] * BLOCK + o[None, :], acc.to(tl.float16))

    @gated(lambda fn: [Spec("fp16", signature(fn, "fp16"), {}, {"num_warps": 4}, archs=(90,), floor=0.0)],
           tensor_cores="wgmma")
    @triton.jit
    def toy_mixed(x_ptr, y_ptr):
        """A 64-row dot (wgmma) and a 16-row dot (mma.sync on sm_90 too)."""
        o, r = tl.arange(0, 64), tl.arange(0, 16)
        a = tl.load(x_ptr + o[:, None] * 64 + o[None, :])
        b = tl.load(x_ptr + r[:, None] * 64 + o[None, :])
        tl.store(y_ptr + o[:, None] * 64 + o[None, :], tl.dot(a, a).to(tl.float16))
        tl.store(y_ptr + r[:, None] * 64 + o[None, :], tl.dot(b, a).to(tl.float16))

    @gated(lambda fn: [Spec("fp16", signature(fn, "fp16"), {}, {"num_warps": 4}, archs=(90,), floor=0.99)])
    @triton.jit
    def toy_copy(x_ptr, y_ptr, n):
        """Memory-bound, but 64 FMAs per element make it issue-bound."""
        o = tl.arange(0, 1024)
        for i in range(n):
            x = tl.load(x_ptr + i * 1024 + o).to(tl.float32)
            for _ in tl.static_range(64):
                x = x * 1.5 + 1.0
            tl.store(y_ptr + i * 1024 + o, x.to(tl.float16))

    @gated(lambda fn: [Spec("fp32", signature(fn, "fp32"), {"BLOCK": 48}, {"num_warps": 4}, floor=0.0)])
    @triton.jit
    def toy_broken(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), 1.0)  # 48 is no power of two: a compile error

    assert signature(toy_dot.fn, "bf16", n="i64") == {
        "x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i64", "BLOCK": "constexpr", "ARCH": "constexpr"}
    sys.exit(gate.run(sys.argv[1], perf="--perf" in sys.argv, jobs=1))
''')


def _gate(tmp_path, *args):
    script = tmp_path / "toy_kernels.py"  # @triton.jit needs its source in a file
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def toy_gate(tmp_path_factory):
    result = _gate(tmp_path_factory.mktemp("gate"), "^toy_", "--perf")
    rows = {}
    for line in result.stdout.splitlines():
        if line.startswith("toy_"):
            cols = line.split()
            rows[cols[0], cols[1], cols[2], cols[3]] = cols
    return result, rows


@pytest.mark.slow
def test_gate_reports_every_config_and_arch(toy_gate):
    result, rows = toy_gate
    out = result.stdout + result.stderr
    dot = {(c, a): r for (k, s, c, a), r in rows.items() if (k, s) == ("toy_dot", "fp16")}
    # 2 configs x sm80, sm90, and an ARCH=80 config compiled for sm80 only
    assert len(dot) == 5 and ("BLOCK=32,ARCH=80,w4,s3", "sm80") in dot, out
    big, small = "BLOCK=64,w4,s3", "BLOCK=16,w1,s3"
    assert dot[big, "sm80"][7] == "mma" and dot[big, "sm80"][-1] == "ok", out
    assert dot[big, "sm90"][7] == "wgmma" and dot[big, "sm90"][-1] == "ok", out
    assert int(dot[big, "sm90"][4]) > 0  # registers reported
    # one warp cannot issue wgmma: a kernel that registered for it fails the gate there
    assert dot[small, "sm90"][-1] == "NO-WGMMA"
    pinned = {(c, a): r for (k, s, c, a), r in rows.items() if s == "fp16-b64"}
    assert sorted(pinned) == [(big, "sm80"), (big, "sm90")], out
    # a floor per architecture
    assert pinned[big, "sm80"][-2:] == ["10%", "ok"] and pinned[big, "sm90"][-2:] == ["99%", "LOW"], out
    assert result.returncode == 1
    assert "11 compilations, 6 failures" in out


@pytest.mark.slow
def test_gate_perf_columns(toy_gate):
    result, rows = toy_gate
    out = result.stdout + result.stderr
    row = rows["toy_dot", "fp16", "BLOCK=64,w4,s3", "sm90"]
    assert row[8] == "loop", out  # the dot's loop was found
    assert "64x64x16*4" in row, out  # 4 wgmma 64x64x16 per iteration (K = 64)
    tensor = float(row[-8])
    assert tensor == 4 * 2 * 64 * 64 * 16 / 4096  # tensor cycles per iteration
    assert row[-4].endswith("%") and row[-3].startswith("(")  # ceiling and limiter
    # wgmma and mma.sync in one sm_90 kernel registered for wgmma
    assert rows["toy_mixed", "fp16", "default", "sm90"][-1] == "MMA-SYNC", out
    # a memory-bound kernel reports bytes moved per byte written against DRAM, and its floor fails
    copy = rows["toy_copy", "fp16", "default", "sm90"]
    assert copy[-8] == "2.00B" and copy[-3] == "(issue)" and copy[-1] == "LOW", out
    assert "toy_broken" in out and "ERROR" in rows["toy_broken", "fp32", "default", "sm80"], out


def test_gate_fails_when_no_kernel_matches(tmp_path):
    result = _gate(tmp_path, "^NO_MATCH$")
    assert result.returncode == 1 and "no kernel matches" in result.stdout, result.stdout + result.stderr


def test_every_launched_kernel_is_gated(tmp_path, monkeypatch):
    """The gate finds kernels launched in a module without @gated; fastvl's own kernels have none."""
    from fastvl.gate import ungated_launches
    from fastvl.kernels import import_all

    assert ungated_launches(import_all(), registry.REGISTRY) == []
    (tmp_path / "toy_launch.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl
        from fastvl.kernels.registry import gated

        @triton.jit
        def helper(x):
            return x + 1

        @gated(lambda fn: [])
        @triton.jit
        def checked(x_ptr):
            tl.store(x_ptr, helper(1.0))

        @triton.jit
        def forgotten(x_ptr):
            tl.store(x_ptr, helper(2.0))

        def launch(x):
            checked[(1,)](x)
            forgotten[(1,)](x)
    '''))
    spec = importlib.util.spec_from_file_location("toy_launch", tmp_path / "toy_launch.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(registry, "REGISTRY", [])
    spec.loader.exec_module(module)
    assert ungated_launches([module], registry.REGISTRY) == [("toy_launch", "forgotten")]


def test_registry_rejects_unknown_tensor_core_kind():
    with pytest.raises(ValueError, match="tensor_cores"):
        gated(lambda fn: [Spec("x", {}, {})], tensor_cores="tensor")


def test_prune_by_arch_keeps_configs_of_the_device_family():
    import triton

    configs = [triton.Config({"B": 1, "ARCH": 80}), triton.Config({"B": 2, "ARCH": 90}), triton.Config({"B": 3})]
    kept = prune_by_arch(configs, {})
    # without CUDA only the configs for every architecture remain
    assert [c.kwargs["B"] for c in kept] == [3]


def _toy(x_ptr, n, stride_a, stride_b, stride_c, BLOCK: "tl.constexpr"):
    pass


def test_launch_spec_specialises_like_a_launch():
    from triton.runtime.jit import JITFunction

    kernel = JITFunction(_toy)  # compiled, not interpreted: what the gate sees
    spec = launch_spec("s", kernel, "bf16", {"BLOCK": 64}, {"stride_a": 1, "stride_b": 48, "stride_c": 72}, floor=0.5)
    assert spec.signature == {"x_ptr": "*bf16", "n": "i32", "stride_a": "constexpr", "stride_b": "i32",
                              "stride_c": "i32", "BLOCK": "constexpr"}
    assert spec.constexprs == {"BLOCK": 64, "stride_a": 1}
    assert spec.aligned == ("stride_b",) and spec.floor == 0.5


# ------------------------------------------------------------------ the performance model on SASS text
SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_0:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   STS.128 [R0], R4 ;
.L_x_1:
        /*0030*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, R8, gdesc[UR8].tnspB, R24, gsb0 ;
        /*0050*/                   MUFU.EX2 R1, R2 ;
        /*0060*/                   FFMA R1, R2, R3, R4 ;
        /*0070*/                   LDSM.16.M88.4 R8, [R9] ;
        /*0080*/                   IMAD R1, R2, R3, RZ ;
        /*0090*/              @!P0 BRA `(.L_x_1) ;
        /*00a0*/                   ISETP.GE.AND P1, PT, R0, 0x4, PT ;
        /*00b0*/               @P1 BRA `(.L_x_0) ;
        /*00c0*/                   STG.E.64 desc[UR4][R2.64], R4 ;
        /*00d0*/                   EXIT ;
.L_x_2:
        /*00e0*/                   BRA `(.L_x_2);
"""


def test_perf_finds_the_innermost_hot_loop():
    instrs, labels = perf.parse(SASS)
    assert len(instrs) == 15 and labels == {".L_x_0": 1, ".L_x_1": 3, ".L_x_2": 14}
    assert perf.loops(instrs, labels) == [(3, 9)]  # not the outer loop, not the padding branch-to-self
    p, is_loop = perf.hot_loop(instrs, labels, warps=8)
    assert is_loop and p.instructions == 7
    assert p.classes == {"tensor": 2, "mufu": 1, "fp32": 1, "smem": 1, "int": 1, "branch": 1}
    assert p.shapes == {"wgmma 64x64x16": 1, "wgmma 64x128x16": 1}


def test_perf_ceiling_formula():
    instrs, labels = perf.parse(SASS)
    p, _ = perf.hot_loop(instrs, labels, warps=8)
    # two warpgroups: each issues both wgmmas
    assert p.tensor == {"BF16": 2 * (2 * 64 * 64 * 16 + 2 * 64 * 128 * 16)}
    # shared memory: the first wgmma reads A (64x16) and B (64x16), the second B (128x16); LDSM x4 per warp
    assert p.smem_bytes == 2 * (2048 + 2048 + 4096) + 8 * 32 * 16
    c = perf.ceiling(p, 90, warps=8)
    assert c.cycles == {"tensor": p.tensor["BF16"] / 4096, "issue": 7 * 8 / 4, "mufu": 1 * 256 / 16,
                        "smem": p.smem_bytes / 128}
    assert c.limiter == "tensor" and c.bound == 1.0
    slow = perf.ceiling(dataclasses.replace(p, instructions=200), 90, warps=8)
    assert slow.limiter == "issue" and slow.bound == pytest.approx(c.cycles["tensor"] / (200 * 8 / 4))
    # sm_80's tensor cores do half the work per cycle
    assert perf.ceiling(p, 80, warps=8).cycles["tensor"] == 2 * c.cycles["tensor"]


def test_perf_memory_bound_program():
    sass = "\n".join(SASS.splitlines()[:4]) + "\n        /*0020*/                   STG.E.64 desc[UR4][R2.64], R4 ;\n"
    report = perf.analyse_sass(sass, 90, warps=4)
    assert not report.loop and report.profile.instructions == 3
    assert report.bytes_per_output_byte == (16 + 8) / 8
    assert report.ceiling.work == "dram" and report.ceiling.limiter == "dram" and report.ceiling.bound == 1.0
    assert report.ceiling.cycles["dram"] == (16 + 8) * 32 * 4 / perf.DRAM_BYTES_PER_CYCLE[90]


def test_perf_sizes_tma_copies_from_the_ttgir():
    ttgir = """
    ttng.async_tma_copy_global_to_local %k[%a, %b] %buf, %bar, %p : !tt.tensordesc<128x64xbf16, #s>, !ttg.memdesc<1xi64, #s2, #smem, mutable> -> !ttg.memdesc<128x64xbf16, #s, #smem, mutable>
    ttng.async_tma_copy_global_to_local %k[%a, %c] %buf, %bar, %p : !tt.tensordesc<128x16xbf16, #s>, !ttg.memdesc<1xi64, #s2, #smem, mutable> -> !ttg.memdesc<128x16xbf16, #s, #smem, mutable>
    ttng.async_tma_reduce add, %dq[%a, %b] %t : !tt.tensordesc<64x64xf32, #s>, !ttg.memdesc<64x64xf32, #s, #smem, mutable>
    """
    boxes = perf.tma_boxes(ttgir)
    assert boxes == {"load": (128 * 64 + 128 * 16) * 2 / 2, "store": 64 * 64 * 4}
    sass = """
.L_x_0:
        /*0000*/              @UP4 UTMALDG.2D [UR12], [UR6] ;
        /*0010*/              @UP5 UTMAREDG.2D.ADD [UR16], [UR4] ;
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0030*/              @!P0 BRA `(.L_x_0) ;
"""
    p = perf.analyse_sass(sass, 90, warps=4, ttgir=ttgir).profile
    # one copy per CTA, whatever the warps; the wgmma reads A and B from shared memory
    assert p.load_bytes == boxes["load"] and p.store_bytes == boxes["store"]
    assert p.smem_bytes == boxes["load"] + boxes["store"] + 2048 + 2048

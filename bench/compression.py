"""Visual-token compression at model shapes: patch_merge, spatial_attention_pool, deepstack_add.

For each case and implementation: forward and forward+backward latency, achieved TFLOP/s, achieved
GB/s of the forward's minimum traffic (every input read once, the output written once) and its
fraction of the device's copy bandwidth (a large device-to-device copy measured in the same run),
peak memory, error against the fastvl reference, and the speedup over the PyTorch module path.

Implementations:
- ``fastvl``: the public op on its Triton kernels (CUDA only: the interpreter is no performance number);
- ``reference``: the public op on fastvl's plain-PyTorch reference;
- ``torch-module``: the model code these ops replace, written with torch modules and ops: the HF
  Qwen2-VL PatchMerger (LayerNorm, view, Sequential(Linear, GELU, Linear)); a FlashSloth-style SAP
  (Sequential(Linear, ReLU, Linear) scores, per-window softmax and weighted sum; grids divisible by the
  window); for deepstack_add ``hidden[index] += stacked`` on a copy (``torch-index-put``) and
  ``index_add`` (``torch-index-add``);
- ``torch-linears`` (patch_merge): the PatchMerger's two Linears alone, without its norm and GELU: not the op
  but the floor of it, the GEMMs any implementation computes; its speedup over ``torch-module`` is the most a
  patch_merge on the same BLAS can gain.
On CUDA the patch_merge parts are also timed alone: its two Triton GEMMs (fc1 and the backward's dz, with
their fused epilogues) against torch.matmul at the same shapes, and its memory-bound norm passes against
the copy bandwidth (the DESIGN targets: >= 90% of cuBLAS, >= 85% of copy bandwidth).

CUDA runs bf16 at the embedded model shapes. On CPU the native backend (``fastvl-native``), the reference and
the torch paths run, in fp32 at the model widths on fewer patches, and every case name says ``[cpu]``. ``python -m fastvl.bench.compression [--quick]
[--out DIR]`` writes DIR/compression.json and DIR/compression.png.
"""
import re
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastvl
from fastvl.testing import rel_err

from . import common
from .common import NATIVE_ONLY, TRITON_ONLY, Registry, is_cuda, measured

SUITE = "compression"
TITLE = ("visual-token compression ops (patch_merge, spatial_attention_pool, deepstack_add) against the PyTorch "
         "module paths they replace: forward and forward+backward")
COLUMNS = (("case", "case"), ("impl", "impl"), ("fwd_ms", "fwd (min-max)"), ("fwd_bwd_ms", "fwd+bwd (min-max)"),
           ("tflops", "fwd TFLOP/s"), ("gbps", "fwd GB/s"), ("copy_frac", "of copy BW"), ("peak_mb", "peak MiB"),
           ("rel_err", "err vs ref"), ("vs", "vs"), ("speedup", "fwd+bwd speedup"), ("vs_cublas", "vs cuBLAS"))
BASELINES = ("torch-module", "torch-index-put")  # ``speedup`` is against the one a case has
# the op under a fastvl backend (fn None), or a case's module path by name; one ``register`` line adds a row
IMPLS = Registry()
IMPLS.register("fastvl", backend="triton", unavailable=TRITON_ONLY)
IMPLS.register("fastvl-native", backend="native", unavailable=NATIVE_ONLY)
IMPLS.register("reference", backend="reference")
FLOORS = {"torch-linears"}  # rows that time part of an op's work: no error against the reference
for _name in ("torch-module", "torch-linears", "torch-index-put", "torch-index-add"):
    IMPLS.register(_name)

# (t, h, w) grids: a ~16k-patch Qwen2-VL pack, every side a multiple of 4 (merge 2 and 4 both apply)
QWEN_PACK = [[1, 92, 92], [1, 64, 64], [1, 40, 56], [1, 28, 40]]
SHAPES = {  # device -> {op: [(case, parameters)]}
    "cuda": {
        "patch_merge": [("qwen2vl-2b merger m=2", dict(grids=QWEN_PACK, C=1280, hid=5120, out=1536, m=2)),
                        ("deepstack-e merger m=4", dict(grids=QWEN_PACK, C=1280, hid=5120, out=1536, m=4))],
        "spatial_attention_pool": [("siglip 27x27", dict(grids=[[27, 27]], C=1152, window=3)),
                                   ("siglip hd 5x27x27", dict(grids=[[27, 27]] * 5, C=1152, window=3))],
        "deepstack_add": [("llm 1536, 4x2048 tok, 3980 visual", dict(batch=4, seq=2048, C=1536, visual=995))],
    },
    "cpu": {  # the model widths on fewer patches
        "patch_merge": [("qwen2vl-2b merger m=2", dict(grids=[[1, 32, 32], [1, 16, 24]], C=1280, hid=5120, out=1536, m=2)),
                        ("deepstack-e merger m=4", dict(grids=[[1, 32, 32], [1, 16, 24]], C=1280, hid=5120, out=1536, m=4))],
        "spatial_attention_pool": [("siglip 27x27", dict(grids=[[27, 27]], C=1152, window=3)),
                                   ("siglip hd 5x27x27", dict(grids=[[27, 27]] * 5, C=1152, window=3))],
        "deepstack_add": [("2x512 tok", dict(batch=2, seq=512, C=256, visual=128))],
    },
    "quick": {
        "patch_merge": [("m=2", dict(grids=[[1, 8, 12], [1, 4, 4]], C=32, hid=64, out=48, m=2))],
        "spatial_attention_pool": [("9x9", dict(grids=[[9, 9], [6, 3]], C=32, window=3))],
        "deepstack_add": [("2x64 tok", dict(batch=2, seq=64, C=64, visual=16))],
    },
}


# ------------------------------------------------------------------ the PyTorch module paths
class HFPatchMerger(nn.Module):
    """transformers' Qwen2-VL PatchMerger, as written there."""

    def __init__(self, channels, hidden, out, merge):
        super().__init__()
        self.hidden_size = channels * merge * merge
        self.ln_q = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden_size, hidden), nn.GELU(), nn.Linear(hidden, out))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.hidden_size))


class TorchSAP(nn.Module):
    """FlashSloth-style spatial attention pooling in torch ops (grids divisible by the window)."""

    def __init__(self, channels, window):
        super().__init__()
        self.window = window
        self.score = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, 1))

    def forward(self, x, grids):
        r, channels, outs = self.window, x.shape[1], []
        for (h, w), xi in zip(grids, x.split([h * w for h, w in grids])):
            windows = xi.view(h // r, r, w // r, r, channels).transpose(1, 2).reshape(-1, r * r, channels)
            weights = self.score(windows).softmax(dim=1)
            outs.append((weights * windows).sum(dim=1))
        return torch.cat(outs)


# ------------------------------------------------------------------ cases
@dataclass
class Case:
    op: str
    name: str
    inputs: list  # floating tensors require grad: forward+backward differentiates all of them
    impls: dict  # name -> fn(*inputs) -> output
    gflop: float  # forward
    mbytes: float  # forward minimum traffic
    parts: dict = field(default_factory=dict)  # patch_merge on CUDA: what the part timings need


def _randn(gen, device, dtype, *shape, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype).requires_grad_()


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors) / 1e6


def _merge_case(name, p, device, dtype, gen):
    tokens = sum(t * h * w for t, h, w in p["grids"])
    C, hid, out, m = p["C"], p["hid"], p["out"], p["m"]
    k = m * m * C
    x = _randn(gen, device, dtype, tokens, C)
    params = [_randn(gen, device, dtype, C, scale=0.1, shift=1.0), _randn(gen, device, dtype, C, scale=0.1),
              _randn(gen, device, dtype, hid, k, scale=k ** -0.5), _randn(gen, device, dtype, hid, scale=0.1),
              _randn(gen, device, dtype, out, hid, scale=hid ** -0.5), _randn(gen, device, dtype, out, scale=0.1)]
    module = HFPatchMerger(C, hid, out, m).to(device=device, dtype=dtype)
    names = ["ln_q.weight", "ln_q.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    rows = tokens // (m * m)
    return Case(
        "patch_merge", f"{name}, {tokens} tok C={C} hid={hid} out={out}", [x, *params],
        {"op": lambda *a: fastvl.patch_merge(*a, merge_size=m),
         "torch-module": lambda x, *a: functional_call(module, dict(zip(names, a)), (x,)),
         "torch-linears": lambda x, ln_w, ln_b, w1, b1, w2, b2: F.linear(F.linear(x.view(-1, k), w1, b1), w2, b2)},
        gflop=2 * rows * (k * hid + hid * out) / 1e9,
        mbytes=_nbytes(x, *params) + rows * out * x.element_size() / 1e6,
        parts=dict(m=m, rows=rows, k=k, hid=hid, out=out),
    )


def _sap_case(name, p, device, dtype, gen):
    grids, C, r = p["grids"], p["C"], p["window"]
    tokens = sum(h * w for h, w in grids)
    x = _randn(gen, device, dtype, tokens, C)
    params = [_randn(gen, device, dtype, C, C, scale=C ** -0.5), _randn(gen, device, dtype, C, scale=0.1),
              _randn(gen, device, dtype, 1, C, scale=C ** -0.5), _randn(gen, device, dtype, 1, scale=0.1)]
    grid_hw = torch.tensor(grids)
    module = TorchSAP(C, r).to(device=device, dtype=dtype)
    names = ["score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias"]
    windows = sum(-(-h // r) * -(-w // r) for h, w in grids)
    impls = {"op": lambda x, *a: fastvl.spatial_attention_pool(x, grid_hw, *a, window=r)}
    if all(h % r == 0 and w % r == 0 for h, w in grids):
        impls["torch-module"] = lambda x, *a: functional_call(module, dict(zip(names, a)), (x, grids))
    return Case("spatial_attention_pool", f"{name}, {tokens} tok C={C} window={r}", [x, *params], impls,
                gflop=2 * tokens * C * (C + 1) / 1e9, mbytes=_nbytes(x, *params) + windows * C * x.element_size() / 1e6)


def _deepstack_case(name, p, device, dtype, gen):
    batch, seq, C, visual = p["batch"], p["seq"], p["C"], p["visual"]
    hidden = _randn(gen, device, dtype, batch, seq, C)
    stacked = _randn(gen, device, dtype, batch * visual, C)
    start = seq // 16  # visual tokens after a short text prefix in every sequence
    index = (torch.arange(batch)[:, None] * seq + start + torch.arange(visual)).flatten().to(device)

    def index_put(h, s):
        h = h.clone()
        h.view(-1, C)[index] += s
        return h

    return Case(
        "deepstack_add", f"{name} C={C}", [hidden, stacked],
        {"op": lambda h, s: fastvl.deepstack_add(h, index, s), "torch-index-put": index_put,
         "torch-index-add": lambda h, s: h.view(-1, C).index_add(0, index, s).view_as(h)},
        gflop=0.0, mbytes=_nbytes(hidden, stacked, index) + _nbytes(hidden),
    )


BUILDERS = {"patch_merge": _merge_case, "spatial_attention_pool": _sap_case, "deepstack_add": _deepstack_case}


def cases(device, quick, seed=0):
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = SHAPES["quick" if quick else "cuda" if cuda else "cpu"]
    gen = torch.Generator().manual_seed(seed)
    found = [BUILDERS[op](name, p, device, dtype, gen) for op, entries in shapes.items() for name, p in entries]
    for case in found if not cuda else ():
        case.name += " [cpu]"
    return found


# ------------------------------------------------------------------ measurement
def copy_bandwidth(device, plan, nbytes=None):
    """GB/s of a large device-to-device copy (read + write), the memory-bound ceiling of this device."""
    nbytes = nbytes or ((1 << 30) if is_cuda(device) else (64 << 20))
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = common.measure(lambda: dst.copy_(src), device, plan).median
    return 2 * nbytes / ms / 1e6


def _impls(case, device):
    """(row name, fastvl backend or None, fn) of the registered implementations this case has and the device runs."""
    found = []
    for impl in IMPLS.runnable(device):
        if impl.backend is not None:
            found.append((impl.name, impl.backend, impl.fn or case.impls["op"]))
        elif impl.name in case.impls:
            found.append((impl.name, None, case.impls[impl.name]))
    return found


def steps(case, fn, backend, device):
    leaves = [t for t in case.inputs if t.requires_grad]
    gen = torch.Generator().manual_seed(1)

    def fwd():
        with torch.no_grad(), fastvl.use_backend(backend):
            return fn(*case.inputs)

    dout = torch.randn(fwd().shape, generator=gen).to(device=device, dtype=case.inputs[0].dtype)

    def fwd_bwd():
        with fastvl.use_backend(backend):
            return torch.autograd.grad(fn(*case.inputs), leaves, dout, allow_unused=True)  # a floor uses some

    return fwd, fwd_bwd


def measure_case(case, base, device, plan):
    """The rows of the implementations of ``case``: their forward and forward+backward timed in the same rounds
    (each forward+backward runs once before anything is timed), or the reason one failed."""
    rows, timed_steps, outs, impls = [], {}, {}, _impls(case, device)
    for impl, backend, fn in impls:
        try:
            fwd, fwd_bwd = steps(case, fn, backend, device)
            fwd_bwd()
            outs[impl] = fwd()
        except Exception as exc:  # noqa: BLE001 - a path that fails is reported, the others still run
            rows.append(common.failed_row(base, impl, exc))
            continue
        timed_steps[impl] = {"fwd_ms": fwd, "fwd_bwd_ms": fwd_bwd}
    timed = common.measure_rows(timed_steps, device, plan)
    expected, found = outs.get("reference"), []
    for impl, backend, _ in impls:
        if impl in timed:
            timing, gbps = timed[impl], case.mbytes / timed[impl]["fwd_ms"]
            found.append({
                **base, "impl": impl, "backend": backend, "gflop": case.gflop, "mbytes": case.mbytes, **timing,
                "peak_mb_fwd": common.peak_memory_mb(timed_steps[impl]["fwd_ms"], device),
                "peak_mb": common.peak_memory_mb(timed_steps[impl]["fwd_bwd_ms"], device),
                "tflops": case.gflop / timing["fwd_ms"], "tflops_fwd_bwd": 3 * case.gflop / timing["fwd_bwd_ms"],
                "gbps": gbps, "copy_frac": gbps / base["copy_gbps"],
                "rel_err": None if expected is None or impl in FLOORS else rel_err(outs[impl], expected),
            })
    common.speedups(found, BASELINES, "fwd_bwd_ms")
    common.speedups(found, BASELINES, "fwd_ms", name="speedup_fwd")
    return rows + found


def _part_rows(case, base, copy_gbps, device, plan):
    """patch_merge's GEMMs against torch.matmul, its norm passes against the copy bandwidth (CUDA)."""
    from fastvl.kernels import patch_merge as kernel

    p = case.parts
    x, ln_w, ln_b, w1, b1, w2, b2 = (t.detach() for t in case.inputs)
    xn = kernel.normalise(x, ln_w, ln_b, 1e-6, "layernorm")
    merged = xn.view(p["rows"], p["k"])
    act = x.new_empty(p["rows"], p["hid"])
    pre, dy = torch.randn_like(act), torch.randn(p["rows"], p["out"], dtype=x.dtype, device=x.device)
    dnormed = torch.randn_like(xn)
    gemms = {
        "fc1 (bias+GELU epilogue)": (2 * p["rows"] * p["k"] * p["hid"],
                                     lambda: kernel.matmul(merged, w1.t(), act, kernel.GELU_FORWARD, bias=b1),
                                     lambda: torch.matmul(merged, w1.t())),
        "dz (GELU' epilogue, db1 sums)": (2 * p["rows"] * p["out"] * p["hid"],
                                          lambda: kernel.matmul(dy, w2, act, kernel.GELU_BACKWARD, pre=pre),
                                          lambda: torch.matmul(dy, w2)),
    }
    rows = []
    for part, (flop, ours, cublas) in gemms.items():
        timed = common.measure_rows({"fastvl": {"fwd_ms": ours}, "cublas": {"fwd_ms": cublas}}, device, plan)
        ours_ms, cublas_ms = timed["fastvl"]["fwd_ms"], timed["cublas"]["fwd_ms"]
        rows.append({**base, "op": f"patch_merge/{part}", "impl": "fastvl", "gflop": flop / 1e9, **timed["fastvl"],
                     "tflops": flop / ours_ms / 1e9, "cublas_ms": cublas_ms, "cublas_tflops": flop / cublas_ms / 1e9,
                     **common.ratio(timed["cublas"], timed["fastvl"], "fwd_ms", "vs_cublas")})
    passes = {
        "normalise (read x, write xn)": (2 * _nbytes(x), lambda: kernel.normalise(x, ln_w, ln_b, 1e-6, "layernorm")),
        "norm backward (read x, dX; write dx)": (3 * _nbytes(x),
                                                 lambda: kernel.norm_backward(dnormed, x, ln_w, 1e-6, "layernorm")),
    }
    for part, (mbytes, fn) in passes.items():
        ms = common.measure(fn, device, plan).median
        rows.append({**base, "op": f"patch_merge/{part}", "impl": "fastvl", "mbytes": mbytes, "fwd_ms": ms,
                     "gbps": mbytes / ms, "copy_frac": mbytes / ms / copy_gbps})
    return rows


def run(device, quick, only=None):
    """One row per (case, implementation); CUDA adds the patch_merge part rows; skipped paths say why."""
    cuda = is_cuda(device)
    plan = common.budget(device, quick)
    copy_gbps = copy_bandwidth(device, plan, (16 << 20) if quick else None)
    label = common.device_name(device)
    rows = []
    bar = common.progress([c for c in cases(device, quick) if only is None or re.search(only, f"{c.op} {c.name}")], SUITE)
    for case in bar:
        dtype = common.dtype_name(case.inputs[0].dtype)
        base = {"suite": SUITE, "op": case.op, "case": case.name, "device": label, "dtype": dtype,
                "copy_gbps": copy_gbps}
        bar.set_postfix_str(case.op)
        case_rows = measure_case(case, base, device, plan)
        for row in measured(case_rows):
            common.emit(bar, row, f"fwd {common.fmt_time(row['fwd_ms'])}, fwd+bwd {common.fmt_time(row['fwd_bwd_ms'])}")
        rows += case_rows
        if cuda and case.op == "patch_merge":
            rows += _part_rows(case, base, copy_gbps, device, plan)
        if cuda:
            torch.cuda.empty_cache()
    return rows + common.skipped_rows(IMPLS, device, {"suite": SUITE, "op": "all", "device": label})


def summary(rows):
    """The DESIGN targets: each op >= 2x its module path (fwd+bwd); patch_merge's GEMMs >= 0.9x torch.matmul's
    speed, its memory-bound passes >= 85% of the copy bandwidth."""
    lines = []
    for r in measured(rows):
        if r["impl"] == "fastvl" and r.get("speedup") is not None:
            lines.append(common.target(f"compression {r['case']}: fastvl fwd+bwd vs {r['vs']}", r["speedup"], 2.0))
        if "vs_cublas" in r:
            lines.append(common.target(f"compression {r['op']}: speed vs torch.matmul", r["vs_cublas"], 0.9))
        elif r["op"].startswith("patch_merge/"):
            lines.append(common.target(f"compression {r['op']}: fraction of copy bandwidth", r["copy_frac"], 0.85))
    return lines


def plot(rows, path):
    """Forward and forward+backward latency per case and implementation (log scale); False without matplotlib."""
    panels = (("fwd_ms", "forward"), ("fwd_bwd_ms", "forward + backward"))
    return common.bar_plot([r for r in measured(rows) if "fwd_bwd_ms" in r], path, panels, "ms", "token compression", log=True)


def main(argv=None):
    from . import suite_main

    return suite_main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())

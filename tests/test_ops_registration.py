"""torch.library registration of the ops (opcheck), torch.compile without graph breaks, backend selection.

The opcheck samples are the custom-op calls the public ops make, forward and backward, recorded with a
dispatch mode: they follow the ops' schemas as those evolve, and an op that no public call reaches fails
test_every_custom_op_is_checked.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastvl
from fastvl.testing import assert_close, cu_seqlens, generator, randn

F64 = torch.float64
# raised inside torch's own compile stack, not by fastvl
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


class _Recorder(TorchDispatchMode):
    """Records the fastvl custom-op calls reaching the dispatcher, with detached copies of their inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.backward = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastvl":
            # inputs of forward ops keep requires_grad (autograd registration is checked); backward ops
            # are first-order only
            copy = lambda a: (  # noqa: E731
                a.detach().clone().requires_grad_(a.requires_grad and not self.backward) if isinstance(a, torch.Tensor) else a
            )
            self.calls.append((func, [copy(a) for a in args], {k: copy(v) for k, v in (kwargs or {}).items()}))
        return func(*args, **(kwargs or {}))


def _public_calls(dtype):
    """(name, fn, inputs): small valid calls of every public op; fn(*inputs) returns a tensor."""
    gen = generator(0)
    r = lambda *shape: randn(*shape, dtype=dtype, gen=gen, requires_grad=True)  # noqa: E731
    cu_q, cu_k = cu_seqlens([3, 0, 4]), cu_seqlens([2, 3, 1])
    pos = fastvl.vision_positions(torch.tensor([[1, 2, 2], [1, 2, 4]]))[:7]
    return [
        ("varlen_attention-rope", lambda q, k, v: fastvl.varlen_attention(q, k, v, cu_q, rope_pos=pos, rope_theta=100.0),
         (r(7, 4, 64), r(7, 2, 64), r(7, 2, 64))),
        ("varlen_attention-cross-causal", lambda q, k, v: fastvl.varlen_attention(q, k, v, cu_q, cu_k, causal=True, softmax_scale=0.2),
         (r(7, 2, 80), r(6, 1, 80), r(6, 1, 80))),
        ("apply_rope_2d", lambda x: fastvl.apply_rope_2d(x, pos, 50.0), (r(7, 3, 8),)),
        ("patch_merge-layernorm", lambda *a: fastvl.patch_merge(*a, merge_size=2),
         (r(8, 3), r(3), r(3), r(5, 12), r(5), r(2, 5), r(2))),
        ("patch_merge-rmsnorm", lambda x, w, *a: fastvl.patch_merge(x, w, None, *a, merge_size=2, norm="rmsnorm"),
         (r(8, 3), r(3), r(5, 12), r(5), r(2, 5), r(2))),
        ("spatial_attention_pool", lambda x, *a: fastvl.spatial_attention_pool(x, [(2, 3), (3, 1)], *a, window=2),
         (r(9, 3), r(4, 3), r(4), r(1, 4), r(1))),
        ("deepstack_add", lambda h, s: fastvl.deepstack_add(h, torch.tensor([4, 0, 2]), s), (r(2, 3, 4), r(3, 4))),
        # in place, on a non-leaf activation as inside a model
        ("deepstack_add_", lambda h, s: fastvl.deepstack_add_(h * 1, torch.tensor([4, 0, 2]), s), (r(2, 3, 4), r(3, 4))),
    ]


def _record(dtype):
    recorder = _Recorder()
    with recorder:
        for _, fn, inputs in _public_calls(dtype):
            out = fn(*inputs)
            recorder.backward = True
            torch.autograd.grad(out, inputs, torch.ones_like(out))
            recorder.backward = False
    return recorder.calls


SAMPLES = [
    pytest.param(func, args, kwargs, id=f"{func.name()}-{str(dtype)[6:]}-{i}")
    for dtype in (F64, torch.float32)
    for i, (func, args, kwargs) in enumerate(_record(dtype))
]


def test_every_custom_op_is_checked():
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("fastvl::")}
    checked = {param.values[0].name() for param in SAMPLES}
    assert registered == checked, f"custom ops without an opcheck sample: {registered - checked}"


@pytest.mark.parametrize("func, args, kwargs", SAMPLES)
def test_opcheck(func, args, kwargs):
    torch.library.opcheck(func, args, kwargs)


# ---------------------------------------------------------------- torch.compile


COMPILE_CASES = {name: (fn, inputs) for name, fn, inputs in _public_calls(torch.float32)}
# index builders that read their grid on the host, once per batch, outside the compiled model
HOST_SIDE = {"vision_positions", "deepstack_index", "deepstack_groups"}


def test_every_public_op_is_compiled():
    assert {name.split("-")[0] for name in COMPILE_CASES} | HOST_SIDE == set(fastvl.ops.__all__)


def assert_compiled_matches_eager(name, backend="aot_eager"):
    """COMPILE_CASES[name] compiled without a graph break: output and every input gradient equal eager's."""
    fn, inputs = COMPILE_CASES[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    cotangent = None
    results = []
    for f in (fn, compiled):
        out = f(*inputs)
        cotangent = torch.randn_like(out) if cotangent is None else cotangent
        results.append((out, torch.autograd.grad(out, inputs, cotangent)))
    (out, grads), (ref, ref_grads) = results
    assert_close(out, ref, tol=1e-6)
    for i, (g, ref_g) in enumerate(zip(grads, ref_grads)):
        assert_close(g, ref_g, tol=1e-6, name=f"grad {i}")


@pytest.mark.parametrize("name", COMPILE_CASES)
def test_compile_fullgraph_matches_eager(name):
    assert_compiled_matches_eager(name)


def test_compile_inductor_varlen_attention():
    """The full inductor pipeline on the op most models compile (cu_seqlens values are not read)."""
    fn, inputs = COMPILE_CASES["varlen_attention-rope"]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    cotangent = torch.randn(inputs[0].shape)
    ref = torch.autograd.grad(fn(*inputs), inputs, cotangent)
    out = torch.autograd.grad(compiled(*inputs), inputs, cotangent)
    for g, ref_g in zip(out, ref):
        assert_close(g, ref_g, tol=1e-6)


def test_spatial_attention_pool_grid_as_list_or_tensor():
    gen = generator(0)
    x, w1, b1, w2, b2 = (randn(*s, dtype=F64, gen=gen) for s in ((39, 6), (5, 6), (5,), (1, 5), (1,)))
    grids = [(5, 7), (1, 4)]
    out = fastvl.spatial_attention_pool(x, grids, w1, b1, w2, b2, window=3)
    for grid in (torch.tensor(grids), torch.tensor(grids, dtype=torch.int32), [list(g) for g in grids], tuple(grids)):
        assert torch.equal(fastvl.spatial_attention_pool(x, grid, w1, b1, w2, b2, window=3), out)
    assert out.shape == (2 * 3 + 1 * 2, 6)  # 5x7 -> 2x3 windows, 1x4 -> 1x2


# ---------------------------------------------------------------- backend selection


def test_unknown_backend_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="set_backend: unknown backend 'cuda'"):
        fastvl.set_backend("cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        with fastvl.use_backend("Triton"):
            pass
    assert fastvl.get_backend() == "reference"  # the failed calls changed nothing
    with fastvl.use_backend(None):
        monkeypatch.setenv("FASTVL_BACKEND", "tritonn")
        with pytest.raises(ValueError, match="FASTVL_BACKEND: unknown backend 'tritonn'"):
            fastvl.get_backend()


def test_backend_precedence(monkeypatch):
    with fastvl.use_backend("auto"):
        monkeypatch.setenv("FASTVL_BACKEND", "reference")
        assert fastvl.get_backend() == "reference"
        monkeypatch.setenv("FASTVL_BACKEND", "auto")
        assert fastvl.get_backend() is None
        monkeypatch.setenv("FASTVL_BACKEND", "")
        assert fastvl.get_backend() is None
        monkeypatch.setenv("FASTVL_BACKEND", "triton")
        with fastvl.use_backend("reference"):  # set_backend wins over the environment
            assert fastvl.get_backend() == "reference"
        assert fastvl.get_backend() == "triton"
    with pytest.raises(KeyError):
        with fastvl.use_backend("triton"):
            raise KeyError  # restored on the way out of an exception too
    assert fastvl.get_backend() == "reference"


_SUBPROCESS = r"""
import json, os, torch, fastvl
x, pos = torch.randn(3, 1, 8), torch.tensor([[0, 0], [1, 2], [3, 1]], dtype=torch.int32)
result = {"auto": fastvl.get_backend()}
result["auto_matches_reference"] = bool(torch.allclose(fastvl.apply_rope_2d(x, pos), fastvl.reference.apply_rope_2d(x, pos)))
def attempt():
    try:
        fastvl.apply_rope_2d(x, pos)
        return "ran"
    except RuntimeError as exc:
        return str(exc)
fastvl.set_backend("triton")
result["set_backend"] = attempt()
fastvl.set_backend(None)
os.environ["FASTVL_BACKEND"] = "triton"
result["env"] = attempt()
print(json.dumps(result))
"""


def test_triton_on_cpu_without_interpreter_needs_guidance():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVL_BACKEND")}
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["auto"] is None and result["auto_matches_reference"]
    for how in ("set_backend", "env"):
        assert "TRITON_INTERPRET=1" in result[how] and "CUDA" in result[how], result[how]


FIRST_CALLS = """
import sys, torch, fastvl
grid = torch.tensor([[1, 4, 6], [1, 2, 2]])
layout = fastvl.layout.vision_layout(grid, 2)
q = torch.randn(28, 2, 8, requires_grad=True)
fastvl.varlen_attention(q, q, q, layout.cu_seqlens, rope_pos=layout.positions).sum().backward()
x = torch.randn(28, 4, requires_grad=True)
fastvl.patch_merge(x, torch.ones(4), torch.zeros(4), torch.randn(8, 16), torch.zeros(8), torch.randn(3, 8),
                   torch.zeros(3)).sum().backward()
print("torch._dynamo" in sys.modules)
"""


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_first_calls_do_not_import_dynamo(backend):
    """Importing fastvl and its first op calls stay clear of torch._dynamo, whose import takes seconds."""
    env = {**os.environ, "FASTVL_BACKEND": backend}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", FIRST_CALLS], env=env, capture_output=True, text=True, check=True,
                         timeout=120)
    assert out.stdout.strip() == "False", out.stderr

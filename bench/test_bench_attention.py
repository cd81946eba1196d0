"""pytest-benchmark suite of the attention benchmark (bench/attention.py), one test per measurement.

    pytest bench/test_bench_attention.py                      # CPU rows here, the CUDA rows on a GPU
    pytest bench/test_bench_attention.py --benchmark-disable  # each step once, as a smoke test
"""
import pytest
import torch

from fastvl.bench import attention

IMPLS = {impl.name: impl for impl in attention.IMPLS}
passes = pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])


def _bench(benchmark, impl_name, case, backward, rounds, warmup):
    impl = IMPLS[impl_name]
    reason = impl.unavailable(torch.device(case.device))
    if reason:
        pytest.skip(reason)
    fwd, fwd_bwd = attention.steps(impl, case)
    step = fwd_bwd if backward else fwd

    def run():
        result = step()
        if case.device == "cuda":
            torch.cuda.synchronize()
        return result

    flop = case.flop_fwd * (3.5 if backward else 1.0)
    benchmark.extra_info.update(case=case.name, impl=impl_name, gflop=flop / 1e9,
                                backend=attention.backend_used(impl, case), dtype=str(case.dtype))
    result = benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
    assert all(torch.isfinite(t).all() for t in (result if backward else (result,)))


@passes
@pytest.mark.parametrize("impl", ["reference", "hf-sdpa-loop"])
def test_cpu(benchmark, impl, backward):
    case = attention.Case("qwen2vl-vit", "cpu-quick", attention.PACKS_QUICK["cpu-quick"], "cpu", torch.float32)
    _bench(benchmark, impl, case, backward, rounds=3, warmup=1)


@pytest.mark.parametrize("model", list(attention.MODELS))
@pytest.mark.parametrize("impl", [name for name in IMPLS if name != "reference"])
@passes
@pytest.mark.parametrize("pack", ["16k"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda(benchmark, pack, backward, impl, model):
    case = attention.Case(model, pack, attention.PACKS_CUDA[pack], "cuda", torch.bfloat16)
    _bench(benchmark, impl, case, backward, rounds=10, warmup=3)

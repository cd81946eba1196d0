"""pytest-benchmark suite of the compression benchmark (bench/compression.py), one test per measurement.

    pytest bench/test_bench_compression.py                      # CPU rows here, the CUDA rows on a GPU
    pytest bench/test_bench_compression.py --benchmark-disable  # each step once, as a smoke test
"""
import pytest
import torch

from fastvl.bench import compression

passes = pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
OPS = list(compression.BUILDERS)


def _bench(benchmark, case, impl, backward, device, rounds, warmup):
    backend, fn = {name: (backend, fn) for name, backend, fn in compression._impls(case, device)}[impl]
    fwd, fwd_bwd = compression.steps(case, fn, backend, device)
    step = fwd_bwd if backward else fwd

    def run():
        result = step()
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    benchmark.extra_info.update(op=case.op, case=case.name, impl=impl, gflop=case.gflop, mbytes=case.mbytes,
                                dtype=str(case.inputs[0].dtype))
    result = benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
    assert all(torch.isfinite(t).all() for t in (result if backward else (result,)))


def _case(op, device, quick):
    return next(c for c in compression.cases(device, quick) if c.op == op)


@passes
@pytest.mark.parametrize("impl", ["reference", "module"])
@pytest.mark.parametrize("op", OPS)
def test_cpu(benchmark, op, impl, backward):
    case = _case(op, "cpu", quick=True)
    impl = "reference" if impl == "reference" else next(name for name in case.impls if name != "op")
    _bench(benchmark, case, impl, backward, "cpu", rounds=3, warmup=1)


@passes
@pytest.mark.parametrize("impl", ["fastvl", "reference", "module"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda(benchmark, op, impl, backward):
    case = _case(op, "cuda", quick=False)
    impl = impl if impl != "module" else next(name for name in case.impls if name != "op")
    _bench(benchmark, case, impl, backward, "cuda", rounds=10, warmup=3)

"""Compile gate: every registered Triton kernel, every autotune config, for sm_80 and sm_90, without a GPU.

Prints registers, spills, shared memory and the matrix instructions of each compilation; fails on a
compile error, a spill, a kernel that registered tensor-core dots but compiled without them, a kernel
launched in fastvl.kernels without being registered, or a pattern that selects no kernel. With
``perf`` it also reads each compilation's SASS hot loop (fastvl/perf.py) and fails on mma.sync in a
kernel registered for wgmma on sm_90 and on a ceiling below the spec's floor.
"""
import ast
import contextlib
import functools
import inspect
import multiprocessing
import os
import re
import sys

from . import perf as perf_model

ARCHS = (80, 90)


def _matrix_ops(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "-"


def compile_one(gated, spec, constexprs, options, cap, with_perf=False):
    """One compilation as a launch specialises it: resources, matrix instructions and (``with_perf``)
    the performance-model report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(spec.signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in spec.signature.items()
             if t.startswith("*") or n in spec.aligned}
    src = ASTSource(fn=gated.jit_fn, signature=spec.signature, constexprs={**spec.constexprs, **constexprs}, attrs=attrs)
    options = {**spec.options, **options}
    kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
    cubin = kernel.asm["cubin"]
    res = perf_model.resources(cubin)
    row = {"regs": res["REG"], "spills": res["STACK"] + res["LOCAL"], "shared": kernel.metadata.shared,
           "matrix": _matrix_ops(kernel.asm["ptx"])}
    if with_perf:
        sass = perf_model.disassemble(cubin)
        row["report"] = perf_model.analyse_sass(sass, cap, kernel.metadata.num_warps, kernel.asm["ttgir"])
        row["mma_sync"] = "HMMA" in sass
    return row


def _verdict(gated, spec, row, cap):
    if row["spills"]:
        return "SPILL"
    want = gated.tensor_cores
    if want and row["matrix"] == "-":
        return "NO-TC"
    if want == "wgmma" and cap >= 90 and row["matrix"] != "wgmma":
        return "NO-WGMMA"
    if "report" in row:
        if want == "wgmma" and cap >= 90 and row["mma_sync"]:
            return "MMA-SYNC"
        floor = spec.floor_on(cap)
        if floor is None:
            return "NO-FLOOR"
        if row["report"].ceiling.bound < floor:
            return "LOW"
    return "ok"


def ungated_launches(modules, registry):
    """(module, name) of every kernel launched as ``name[grid](...)`` in ``modules`` but not registered."""
    from triton.runtime.jit import KernelInterface

    registered = {id(g.kernel) for g in registry}
    found = []
    for module in modules:
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and isinstance(node.func.value, ast.Name):
                obj = getattr(module, node.func.value.id, None)
                if isinstance(obj, KernelInterface) and id(obj) not in registered:
                    found.append((module.__name__, node.func.value.id))
    return sorted(set(found))


def _jobs(registry, pattern, archs):
    for gi, gated in enumerate(registry):
        if pattern and not re.search(pattern, gated.name):
            continue
        for si, spec in enumerate(gated.specs(gated.jit_fn)):
            for ci, (label, constexprs, _) in enumerate(gated.configs):
                # a spec that sets a constexpr of the configs (e.g. the block its launch uses) takes only
                # the configs that agree; an ARCH-tagged config runs on that architecture family only
                if any(spec.constexprs.get(k, v) != v for k, v in constexprs.items() if k != "ARCH"):
                    continue
                for cap in archs:
                    if cap in spec.archs and constexprs.get("ARCH", cap) == cap:
                        yield gi, si, ci, cap


def _run_job(job, with_perf):
    """(job, row or the compile error's last line); runs in a worker process (the registry is inherited)."""
    from fastvl.kernels.registry import REGISTRY

    gi, si, ci, cap = job
    gated = REGISTRY[gi]
    spec = gated.specs(gated.jit_fn)[si]
    _, constexprs, options = gated.configs[ci]
    try:
        return job, compile_one(gated, spec, constexprs, options, cap, with_perf)
    except Exception as exc:  # noqa: BLE001 - every compile failure is reported, then fails the gate
        msg = str(exc).strip().splitlines()
        return job, msg[-1] if msg else repr(exc)


def _perf_columns(row):
    r = row["report"]
    p, c = r.profile, r.ceiling.cycles
    counts = " ".join(f"{p.classes[k]:>4}" for k in perf_model.CLASSES)
    shapes = ",".join(f"{s.split()[1]}*{n}" for s, n in sorted(p.shapes.items())) or "-"
    work = f"{c['tensor']:>6.0f}" if r.ceiling.work == "tensor" else f"{r.bytes_per_output_byte:>5.2f}B"
    return (f"{'loop' if r.loop else 'prog':4} {p.instructions:>5} {counts} {shapes:32} {work} {c['issue']:>6.0f} "
            f"{c['mufu']:>6.0f} {c['smem']:>6.0f} {str(r.ceiling):>14}")


def run(pattern: str | None = None, perf: bool = False, jobs: int | None = None, archs=ARCHS,
        out=sys.stdout) -> int:
    """Compile (and with ``perf`` analyse) every selected kernel/spec/config on ``archs``; 1 on any failure."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from fastvl.kernels import import_all
    from fastvl.kernels.registry import REGISTRY

    modules = import_all()
    failures = 0
    for module, name in ungated_launches(modules, REGISTRY):
        failures += 1
        print(f"UNGATED {module}.{name}: launched but not registered with @gated", file=out)
    todo = list(_jobs(REGISTRY, pattern, archs))
    if not todo:
        print(f"no kernel matches {pattern!r}", file=out)
        return 1
    header = f"{'kernel':24} {'spec':26} {'config':38} {'arch':5} {'regs':>4} {'spill':>5} {'smem':>6} {'mma':5}"
    if perf:
        header += (f" {'':4} {'instr':>5} " + " ".join(f"{k[:4]:>4}" for k in perf_model.CLASSES)
                   + f" {'tensor shapes':32} {'tc/B':>6} {'issue':>6} {'mufu':>6} {'smem':>6} {'ceiling':>14} {'floor':>5}")
    print(header + " status", file=out)
    workers = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    job = functools.partial(_run_job, with_perf=perf)
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None  # kernels are imported
    with pool or contextlib.nullcontext():
        for (gi, si, ci, cap), row in (pool.imap(job, todo) if pool else map(job, todo)):
            gated = REGISTRY[gi]
            spec = gated.specs(gated.jit_fn)[si]
            label = gated.configs[ci][0]
            key = f"{gated.name:24} {spec.name:26} {label:38} sm{cap:<3}"
            if isinstance(row, str):
                failures += 1
                print(f"{key} ERROR {row}", file=out)
                continue
            status = _verdict(gated, spec, row, cap)
            failures += status != "ok"
            line = f"{key} {row['regs']:>4} {row['spills']:>5} {row['shared']:>6} {row['matrix']:5}"
            if perf:
                floor = "-" if spec.floor_on(cap) is None else f"{100 * spec.floor_on(cap):.0f}%"
                line += f" {_perf_columns(row)} {floor:>5}"
            print(f"{line} {status}", file=out, flush=True)
    print(f"{len(todo)} compilations, {failures} failures", file=out)
    return 1 if failures else 0

"""Compile gate: every registered Triton kernel, every autotune config, for sm_80 and sm_90, without a GPU.

Prints registers, spills, shared memory and the matrix instructions of each compilation; fails on a
compile error, a spill, or a kernel that registered tensor-core dots but compiled without them.
"""
import os
import re
import subprocess
import sys
import tempfile

ARCHS = (80, 90)


def _resources(ptx: str, cap: int) -> tuple[int, int, int]:
    """(registers, spill bytes, stack bytes) that ptxas reports for the kernel (Triton's ptxas and flags)."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(cap).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")]
        result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"ptxas failed: {result.stderr.strip()}")
    out = result.stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    stack = int(re.search(r"(\d+) bytes stack frame", out).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return regs, spills, stack


def _matrix_ops(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "-"


def compile_one(gated, spec, constexprs, options, cap):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(spec.signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in spec.signature.items()
             if t.startswith("*") or n in spec.aligned}
    src = ASTSource(fn=gated.jit_fn, signature=spec.signature, constexprs={**spec.constexprs, **constexprs}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={**spec.options, **options})
    ptx = kernel.asm["ptx"]
    regs, spills, stack = _resources(ptx, cap)
    return {"regs": regs, "spills": spills, "stack": stack, "shared": kernel.metadata.shared, "matrix": _matrix_ops(ptx)}


def _verdict(gated, row, cap):
    if row["spills"] or row["stack"]:
        return "SPILL"
    want = gated.tensor_cores
    if want and row["matrix"] == "-":
        return "NO-TC"
    if want == "wgmma" and cap >= 90 and row["matrix"] != "wgmma":
        return "NO-WGMMA"
    return "ok"


def run(pattern: str | None = None, out=sys.stdout) -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from fastvl.kernels import import_all
    from fastvl.kernels.registry import REGISTRY

    import_all()
    failures, rows = 0, 0
    header = f"{'kernel':34} {'spec':22} {'config':38} {'arch':5} {'regs':>4} {'spill':>5} {'smem':>7} {'mma':6} status"
    print(header, file=out)
    for gated in REGISTRY:
        if pattern and not re.search(pattern, gated.name):
            continue
        for spec in gated.specs(gated.jit_fn):
            for label, constexprs, options in gated.configs:
                for cap in ARCHS:
                    if cap not in spec.archs or constexprs.get("ARCH", cap) != cap:
                        continue  # launched on the other architecture family only
                    rows += 1
                    try:
                        row = compile_one(gated, spec, constexprs, options, cap)
                    except Exception as exc:  # noqa: BLE001 - every compile failure is reported, then fails the gate
                        failures += 1
                        msg = str(exc).strip().splitlines()
                        print(f"{gated.name:34} {spec.name:22} {label:38} sm{cap:<3} ERROR {msg[-1] if msg else exc!r}", file=out)
                        continue
                    status = _verdict(gated, row, cap)
                    failures += status != "ok"
                    print(f"{gated.name:34} {spec.name:22} {label:38} sm{cap:<3} {row['regs']:>4} "
                          f"{row['spills'] + row['stack']:>5} {row['shared']:>7} {row['matrix']:6} {status}", file=out)
    print(f"{rows} compilations, {failures} failures", file=out)
    return 1 if failures else 0

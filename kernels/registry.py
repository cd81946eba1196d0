"""Kernels register here where they are defined, so the compile gate cannot miss one.

    @gated(tensor_cores="wgmma", specs=lambda fn: [Spec("fp16 D=80", signature(fn, "fp16"), {"HEAD_DIM": 80})])
    @triton.autotune(...)
    @triton.jit
    def _kernel(x_ptr, n, BLOCK: tl.constexpr): ...

Pointer arguments are named ``*_ptr``; other non-constexpr arguments are i32 unless the
signature says otherwise (``signature(fn, "bf16", scale="fp32")``). ``launch_spec`` builds a Spec from
the integer arguments a real launch passes, specialised as Triton specialises them.

Every spec declares a ``floor``: the lowest ceiling on the fraction of peak (tensor cores for a kernel
with dots, DRAM bandwidth otherwise) that ``fastvl gate --perf`` accepts for it (fastvl/perf.py).

An autotune config whose kwargs hold ``ARCH`` (80 or 90; the kernel takes it as a constexpr and may
choose its layout by it) belongs to that architecture family only: ``prune_by_arch`` drops the
others at launch, and the gate compiles it for that architecture only.
"""
from dataclasses import dataclass, field

REGISTRY = []


@dataclass
class Spec:
    """One specialisation of a kernel the gate compiles (with each of its autotune configs)."""

    name: str
    signature: dict
    constexprs: dict
    options: dict = field(default_factory=dict)  # num_warps / num_stages when not autotuned
    # integer arguments compiled as multiples of 16, as Triton specialises them at launch; pointers
    # always are (torch allocations are aligned), so the gate sees the vectorised loads real launches get
    aligned: tuple = ()
    archs: tuple = (80, 90)  # the architectures this specialisation is launched on
    # lowest accepted performance-model ceiling (fraction of peak): one for every arch, or {arch: floor}
    floor: float | dict | None = None

    def floor_on(self, arch):
        return self.floor.get(arch) if isinstance(self.floor, dict) else self.floor


@dataclass
class Gated:
    kernel: object
    specs: object  # callable(jit_fn) -> list[Spec], evaluated by the gate only
    tensor_cores: str | None  # None, "mma" (tensor-core dots on every arch) or "wgmma" (wgmma on sm_90)

    @property
    def jit_fn(self):
        from triton.runtime.jit import JITFunction

        fn = self.kernel
        while not isinstance(fn, JITFunction):  # unwrap autotune / heuristics
            fn = fn.fn
        return fn

    @property
    def name(self):
        return self.jit_fn.__name__

    @property
    def configs(self):
        """Autotune configs as (label, constexprs, options); one default entry when not autotuned."""
        fn, found = self.kernel, []
        while fn is not self.jit_fn:
            for cfg in getattr(fn, "configs", []):
                label = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
                label += f",w{cfg.num_warps},s{cfg.num_stages}"
                found.append((label, dict(cfg.kwargs), {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}))
            fn = fn.fn
        return found or [("default", {}, {})]


def arch_family(major: int) -> int:
    """The ARCH value of configs meant for a device of compute capability ``major``.x."""
    return 90 if major >= 9 else 80


def prune_by_arch(configs, named_args, **kwargs):
    """``early_config_prune`` for @triton.autotune: keep the configs of the current device's family."""
    import torch

    family = arch_family(torch.cuda.get_device_capability()[0]) if torch.cuda.is_available() else None
    kept = [c for c in configs if c.kwargs.get("ARCH", family) == family]
    return kept or configs


def gated(specs, tensor_cores=None):
    if tensor_cores not in (None, "mma", "wgmma"):
        raise ValueError(f"tensor_cores must be None, 'mma' or 'wgmma', got {tensor_cores!r}")

    def register(kernel):
        REGISTRY.append(Gated(kernel, specs, tensor_cores))
        return kernel

    return register


def launch_spec(name, fn, dtype, constexprs, ints, types=None, **spec):
    """Spec of a launch whose integer arguments have the values ``ints`` (unlisted ones: unknown), as
    Triton specialises them: a value of 1 becomes a constant, a multiple of 16 gets divisibility 16."""
    sig = signature(fn, dtype, **(types or {}))
    constexprs = dict(constexprs)
    for arg, value in ints.items():
        if sig[arg] != "i32":
            raise ValueError(f"{fn.__name__}: {arg} is not an i32 argument")
        if value == 1:
            sig[arg], constexprs[arg] = "constexpr", 1
    aligned = tuple(arg for arg, value in ints.items() if value != 1 and value % 16 == 0)
    return Spec(name, sig, constexprs, aligned=aligned, **spec)


def signature(fn, dtype, **types):
    """Signature dict for ``fn``: constexpr params, ``*_ptr`` -> ``*dtype``, others i32, ``types`` override."""
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in types:
            sig[p.name] = types[p.name]
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*" + dtype
        else:
            sig[p.name] = "i32"
    return sig

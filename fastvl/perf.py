"""GPU-free performance model: a ceiling on a kernel's fraction of peak, read from its SASS hot loop.

A kernel is compiled as a launch specialises it (``fastvl gate --perf``); nvdisasm gives its SASS. The
hot loop is the innermost loop (a backward branch) with the most tensor-core work, the cheapest such
body when several tie (the unmasked steady-state iteration). Per iteration and per SM (one CTA):

    tensor cycles = matmul FLOPs / FLOPS_PER_CYCLE[arch][operand type]
    issue  cycles = instructions per thread * warps / 4 schedulers
    MUFU   cycles = MUFU instructions per thread * threads / 16
    smem   cycles = shared-memory bytes (LDS/STS/LDSM/STSM/LDGSTS per warp, wgmma operands read from
                    shared memory per warpgroup, TMA copies and reductions per CTA) / 128
    DRAM   cycles = global bytes (LDG/STG/LDGSTS/atomics) / DRAM_BYTES_PER_CYCLE[arch]
    ceiling = work / max(tensor, issue, MUFU, smem[, DRAM])

where work is the tensor cycles for a kernel with dots and the DRAM cycles for a memory-bound one (no
dots: its ceiling is a fraction of DRAM bandwidth; it also reports bytes moved per byte written). A TMA
instruction does not say how much it moves: each counts the average box of the kernel's TMA copies (or
reductions), read from its TTGIR. A
ceiling ignores latency, occupancy, memory stalls and the pipes' interplay: measured fractions are
lower. It ranks designs and catches regressions; it is not a measurement.
"""
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

SCHEDULERS = 4  # warp schedulers per SM, one instruction issued per cycle each
MUFU_PER_CYCLE = 16  # special-function lanes per SM
SMEM_BYTES_PER_CYCLE = 128
# dense tensor-core FLOPs per SM-cycle by operand type (A100: 312 TFLOP/s bf16 over 108 SMs at 1.41 GHz;
# H100/H200: 989 over 132 at 1.83 GHz); DRAM bytes per SM-cycle (A100 80GB 2.0 TB/s, H200 4.8 TB/s)
FLOPS_PER_CYCLE = {80: {"F16": 2048, "BF16": 2048, "TF32": 1024, "E4M3": 2048, "E5M2": 2048},
                   90: {"F16": 4096, "BF16": 4096, "TF32": 2048, "E4M3": 8192, "E5M2": 8192}}
DRAM_BYTES_PER_CYCLE = {80: 13.4, 90: 19.9}

# instruction classes (by opcode, the part before the first dot)
_CLASSES = {
    "mufu": {"MUFU"},
    "fp32": {"FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FSET", "FRND", "FCHK", "FSWZADD",
             "HFMA2", "HMUL2", "HADD2", "HMNMX2", "HSETP2"},
    "cvt": {"F2F", "F2FP", "I2F", "I2FP", "F2I", "F2IP"},
    "shfl": {"SHFL"},
    "gload": {"LDG", "LDGSTS", "UTMALDG", "UBLKCP", "LDC", "ULDC"},
    "gstore": {"STG", "RED", "ATOM", "ATOMG", "REDG", "UTMASTG", "UTMAREDG"},
    "smem": {"LDS", "STS", "LDSM", "STSM", "ATOMS"},
    "sync": {"BAR", "WARPGROUP", "DEPBAR", "LDGDEPBAR", "SYNCS", "MEMBAR", "FENCE", "WARPSYNC", "ARRIVES",
             "BSYNC", "BSSY", "ERRBAR", "CCTL"},
    "branch": {"BRA", "EXIT", "RET", "CALL", "JMP", "NOP", "YIELD"},
}
_CLASS_OF = {op: name for name, ops in _CLASSES.items() for op in ops}
CLASSES = ("tensor", "mufu", "fp32", "int", "cvt", "shfl", "smem", "gload", "gstore", "sync", "branch")

_LINE = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+(?:\w+,\s*)?`\((\.L_x_\d+)\)")
_HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)\.\w+(?:\.(\w+))?")  # M x N x K, accumulator, operands
_HMMA = re.compile(r"HMMA\.(16)(8)(\d+)\.\w+(?:\.(\w+))?")  # m16 n8 kK; no operand type: fp16
_WIDTH = re.compile(r"\.(U8|S8|U16|S16|64|128)\b")
_TMA = re.compile(r"ttng\.async_tma_(copy_global_to_local|reduce|copy_local_to_global)\b.*")
_MEMDESC = re.compile(r"!ttg\.memdesc<([\dx]+)x(bf16|f16|f32|i8|i16|i32|f8E4M3FN|f8E5M2)\b")
_ELEMENT_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "i8": 1, "i16": 2, "i32": 4, "f8E4M3FN": 1, "f8E5M2": 1}


@dataclass
class Instr:
    addr: int
    op: str  # opcode with its modifiers, e.g. HGMMA.64x64x16.F32.BF16
    args: str

    @property
    def opcode(self):
        return self.op.split(".", 1)[0]


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin (nvdisasm from the Triton wheel)."""
    return _tool("nvdisasm", cubin, ["-c"])


def resources(cubin: bytes) -> dict:
    """REG, STACK, SHARED and LOCAL bytes of the cubin's kernel (cuobjdump --dump-resource-usage)."""
    out = _tool("cuobjdump", cubin, ["--dump-resource-usage"])
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out.split("Function", 1)[1])}


def _tool(name, cubin, flags):
    from triton.backends.nvidia.compiler import get_ptxas

    path = os.path.join(os.path.dirname(get_ptxas(90).path), name)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([path, *flags, f.name], capture_output=True, text=True, check=True).stdout


def parse(sass: str) -> tuple[list[Instr], dict]:
    """(instructions in address order, label -> index of the instruction it precedes)."""
    instrs, labels = [], {}
    for line in sass.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(instrs)
            continue
        m = _LINE.search(line)
        if m:
            instrs.append(Instr(int(m.group(1), 16), m.group(2), m.group(3)))
    return instrs, labels


def loops(instrs: list[Instr], labels: dict) -> list[tuple[int, int]]:
    """Innermost loops as [first, last] instruction indices: a branch back to a lower address closes one."""
    found = []
    for i, ins in enumerate(instrs):
        m = _BRANCH.search(f"{ins.op} {ins.args}") if ins.opcode == "BRA" else None
        if m and labels.get(m.group(1), i + 1) <= i:
            found.append((labels[m.group(1)], i))
    found = [(a, b) for a, b in found if b > a]  # not the branch-to-self that pads the end of the code
    return [(a, b) for a, b in found if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in found)]


@dataclass
class Profile:
    """Instruction counts (per thread) of a range of SASS, and the work they do (per CTA)."""

    instructions: int = 0
    classes: Counter = field(default_factory=Counter)
    shapes: Counter = field(default_factory=Counter)  # e.g. "wgmma 64x64x16", "mma 16816"
    tensor: dict = field(default_factory=Counter)  # FLOPs per operand type
    smem_bytes: float = 0.0
    load_bytes: float = 0.0
    store_bytes: float = 0.0


def tma_boxes(ttgir: str) -> dict:
    """Average bytes of the kernel's TMA copies into shared memory ("load") and out of it ("store":
    stores and reductions), from the shared-memory tiles of its TTGIR ops."""
    sizes = {"load": [], "store": []}
    for m in _TMA.finditer(ttgir):
        tiles = [t for t in _MEMDESC.findall(m.group(0)) if t[0] != "1"]  # not the 1xi64 barrier
        if tiles:
            dims, kind = tiles[-1]
            size = _ELEMENT_BYTES[kind]
            for d in dims.split("x"):
                size *= int(d)
            sizes["load" if m.group(1) == "copy_global_to_local" else "store"].append(size)
    return {k: sum(v) / len(v) for k, v in sizes.items() if v}


def profile(instrs: list[Instr], warps: int, tma: dict | None = None) -> Profile:
    """Counts of ``instrs``; ``tma``: tma_boxes() of the kernel."""
    tma = tma or {}
    p = Profile(instructions=len(instrs))
    groups = max(warps // 4, 1)
    for ins in instrs:
        op, code = ins.op, ins.opcode
        if code == "HGMMA":
            m, n, k, kind = _HGMMA.match(op).groups(default="F16")
            m, n, k = int(m), int(n), int(k)
            p.classes["tensor"] += 1
            p.shapes[f"wgmma {m}x{n}x{k}"] += 1
            p.tensor[kind] += 2 * m * n * k * groups
            elt = 32 // k  # bytes per operand element: K * size is always 32 bytes
            a_from_smem = ins.args.split(",")[1].strip().startswith("gdesc")
            p.smem_bytes += (n * k * elt + (m * k * elt if a_from_smem else 0)) * groups
            continue
        if code == "HMMA":
            m, n, k, kind = _HMMA.match(op).groups(default="F16")
            p.classes["tensor"] += 1
            p.shapes[f"mma m{m}n{n}k{k}"] += 1
            p.tensor[kind] += 2 * int(m) * int(n) * int(k) * warps
            continue
        cls = _CLASS_OF.get(code, "int")
        p.classes[cls] += 1
        if code == "UTMALDG":  # one copy per CTA
            p.smem_bytes += tma.get("load", 0)
            p.load_bytes += tma.get("load", 0)
            continue
        if code in ("UTMASTG", "UTMAREDG"):
            p.smem_bytes += tma.get("store", 0)
            p.store_bytes += tma.get("store", 0)
            continue
        bytes_per_warp = 32 * _access_bytes(op)
        if cls == "smem":
            p.smem_bytes += bytes_per_warp * warps
        elif code == "LDGSTS":  # global -> shared: both
            p.smem_bytes += bytes_per_warp * warps
            p.load_bytes += bytes_per_warp * warps
        elif code in ("LDG",):
            p.load_bytes += bytes_per_warp * warps
        elif cls == "gstore" and code in ("STG", "RED", "REDG", "ATOM", "ATOMG"):
            p.store_bytes += bytes_per_warp * warps
    return p


def _access_bytes(op: str) -> float:
    """Bytes per thread of a load/store (LDSM/STSM: per thread of the 8x8 matrices it moves)."""
    if op.startswith(("LDSM", "STSM")):
        count = op.rsplit(".", 1)[-1]
        return 4 * (int(count) if count.isdigit() else 1)
    m = _WIDTH.search(op)
    if not m:
        return 4
    return {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}[m.group(1)]


@dataclass
class Ceiling:
    """Cycles per loop iteration on each pipe, and the resulting bound (fraction of the work pipe's peak)."""

    work: str  # "tensor" or "dram"
    cycles: dict  # pipe -> cycles
    bound: float
    limiter: str

    def __str__(self):
        return f"{100 * self.bound:.0f}% ({self.limiter})"


def ceiling(p: Profile, arch: int, warps: int) -> Ceiling:
    rates = FLOPS_PER_CYCLE[arch]
    cycles = {
        "tensor": sum(flops / rates[kind] for kind, flops in p.tensor.items()),
        "issue": p.instructions * warps / SCHEDULERS,
        "mufu": p.classes["mufu"] * 32 * warps / MUFU_PER_CYCLE,
        "smem": p.smem_bytes / SMEM_BYTES_PER_CYCLE,
    }
    work = "tensor"
    if not p.tensor:
        work = "dram"
        cycles["dram"] = (p.load_bytes + p.store_bytes) / DRAM_BYTES_PER_CYCLE[arch]
    limiter = max(cycles, key=cycles.get)
    return Ceiling(work, cycles, cycles[work] / cycles[limiter] if cycles[limiter] else 0.0, limiter)


@dataclass
class Report:
    loop: bool  # False: the kernel has no loop, the whole program was counted
    profile: Profile
    ceiling: Ceiling

    @property
    def bytes_per_output_byte(self):
        p = self.profile
        return (p.load_bytes + p.store_bytes) / p.store_bytes if p.store_bytes else float("inf")


def hot_loop(instrs: list[Instr], labels: dict, warps: int, tma: dict | None = None):
    """(Profile of the hot loop, True), or of the whole program and False when it has no loop."""
    candidates = [profile(instrs[a:b + 1], warps, tma) for a, b in loops(instrs, labels)]
    if not candidates:
        return profile(instrs, warps, tma), False
    return max(candidates, key=lambda p: (sum(p.tensor.values()), p.load_bytes + p.store_bytes, -p.instructions)), True


def analyse_sass(sass: str, arch: int, warps: int, ttgir: str = "") -> Report:
    """The model's report on a kernel's SASS (``disassemble``), compiled for ``arch`` with ``warps`` warps;
    its ``ttgir`` sizes the TMA copies."""
    instrs, labels = parse(sass)
    p, is_loop = hot_loop(instrs, labels, warps, tma_boxes(ttgir))
    return Report(is_loop, p, ceiling(p, arch, warps))

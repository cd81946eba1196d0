"""Input validation shared by the public ops: clear ValueError/TypeError naming the argument."""
import math
import numbers

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int32, torch.int64)
INT32_MAX = 2**31 - 1  # sizes and offsets index int32 in the kernels
FLOAT32_TINY, FLOAT32_MAX = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max  # normal range
# The rotary frequencies theta^(-4j/D) are below 1/theta: from theta = 2^-96 on, any int32 position times any
# frequency is below 2^31 * 2^96 = 2^127, an angle finite in float32 (the ops' precision)
ROPE_THETA_MIN = 2.0**-96


def _name(dtypes):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(name, t, *, dtypes=FLOATS, ndim=None, device=None, optional=False):
    """Check type, dtype, rank and device of one argument; returns it."""
    if t is None and optional:
        return t
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_name(dtypes)}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")
    # kernels index the last dimension densely (integer tensors too: offsets, positions, indices)
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit stride in its last dimension, got strides {t.stride()}")
    return t


def shape(name, t, expected):
    """``expected``: tuple of ints or None (any)."""
    if t.dim() != len(expected) or any(e is not None and s != e for s, e in zip(t.shape, expected)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    return t


def same_dtype(name, t, ref_name, ref):
    if t is not None and t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def positive_int(name, value, minimum=1, maximum=INT32_MAX):
    """A Python int (numpy integers too, never a bool) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}")
    return value


def number(name, value, positive=True):
    """A finite real number (never a bool or a tensor) as a float; > 0 when ``positive``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        value = math.inf if value > 0 else -math.inf
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def scale(name, value):
    """A positive number in float32's normal range: the kernels compute in fp32, where a larger one is inf and a
    smaller one 0 or subnormal (0 under flush-to-zero arithmetic): a softmax scale of 0 times a masked -inf score
    is NaN, a norm's eps of 0 over a constant row divides by 0."""
    value = number(name, value)
    if not FLOAT32_TINY <= value <= FLOAT32_MAX:
        raise ValueError(f"{name} must be in [2**-126, {FLOAT32_MAX!r}] (float32's normal range), got {value!r}")
    return value


def rope_theta(name, value):
    """A RoPE base theta >= 2^-96: all its rotation angles are finite in float32."""
    value = number(name, value)
    if value < ROPE_THETA_MIN:
        raise ValueError(f"{name} must be >= 2**-96 (~{ROPE_THETA_MIN:.3g}) so that the rotary frequencies "
                         f"theta^(-4j/D) times int32 positions stay finite in float32, got {value!r}")
    return value


def cu_seqlens(name, cu, total, device, max_seqlen=None, max_name="max_seqlen"):
    """Validate int32 [B+1] cumulative lengths (0 first, non-decreasing, ``total`` last) on ``device``.

    Returns the longest segment (or an upper bound of it). ``max_seqlen`` never exceeds ``total``.
    On CUDA with ``max_seqlen`` given the values are trusted and no host sync happens; otherwise one
    sync reads first, last, monotonicity and the maximum together. Under torch.compile values are
    not read (no graph break): the token count then bounds ``max_seqlen``.
    """
    tensor(name, cu, dtypes=(torch.int32,), ndim=1, device=device)
    if cu.numel() < 1:
        raise ValueError(f"{name} must have at least one element (0), got an empty tensor")
    if max_seqlen is not None:
        positive_int(max_name, max_seqlen, minimum=0)
        if max_seqlen > total:
            raise ValueError(f"{max_name}={max_seqlen} exceeds the token count {total}")
        if cu.device.type == "cuda" or torch.compiler.is_compiling():
            return max_seqlen
    elif torch.compiler.is_compiling():
        return total
    cu = cu.to(torch.int64)  # int32 differences wrap around
    lengths = cu[1:] - cu[:-1]
    first, last, bad, longest = torch.stack([
        cu[0], cu[-1], (lengths < 0).sum(), lengths.max() if lengths.numel() else cu[0] * 0,
    ]).tolist()
    if first != 0:
        raise ValueError(f"{name} must start at 0, got {first}")
    if bad:
        raise ValueError(f"{name} must be non-decreasing")
    if last != total:
        raise ValueError(f"{name} must end at the token count {total}, got {last}")
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest segment of {name} ({longest})")
    return longest if max_seqlen is None else max_seqlen


def grid(name, g, columns, sequences=False):
    """Positive integer sizes [N, columns]: a tensor, or with ``sequences`` also a list/tuple of
    ``columns``-tuples (static under torch.compile); returns the rows as Python lists."""
    if sequences and isinstance(g, (list, tuple)):
        rows = [list(row) if isinstance(row, (list, tuple)) else row for row in g]
        if any(not isinstance(row, list) or len(row) != columns for row in rows):
            raise ValueError(f"{name} must be a list of {columns}-tuples, got {g!r}")
        if any(isinstance(v, bool) or not isinstance(v, int) for row in rows for v in row):
            raise TypeError(f"{name} must hold Python ints, got {g!r}")
    else:
        tensor(name, g, dtypes=INTS, ndim=2)
        if g.shape[1] != columns:
            raise ValueError(f"{name} must have shape [N, {columns}], got {list(g.shape)}")
        rows = g.tolist()
    if any(v < 1 for row in rows for v in row):
        raise ValueError(f"{name} must hold positive sizes, got {rows}")
    tokens = sum(math.prod(row) for row in rows)
    if tokens > INT32_MAX:
        raise ValueError(f"{name} covers {tokens} tokens, more than {INT32_MAX}")
    return rows

"""Input validation shared by the public ops: clear ValueError/TypeError naming the argument."""
import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int32, torch.int64)
HEAD_DIMS = (64, 72, 80, 96, 128)


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


def positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def number(name, value, positive=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return float(value)


def cu_seqlens(name, cu, total, device, max_seqlen=None, max_name="max_seqlen"):
    """Validate int32 [B+1] cumulative lengths (0 first, non-decreasing, ``total`` last) on ``device``.

    Returns the longest segment (or an upper bound of it). On CUDA with ``max_seqlen`` given the
    values are trusted and no host sync happens; otherwise one sync reads first, last, monotonicity
    and the maximum together. Under torch.compile values are not read (no graph break): the token
    count then bounds ``max_seqlen``.
    """
    tensor(name, cu, dtypes=(torch.int32,), ndim=1, device=device)
    if cu.numel() < 1:
        raise ValueError(f"{name} must have at least one element (0), got an empty tensor")
    if max_seqlen is not None:
        positive_int(max_name, max_seqlen, minimum=0)
        if cu.device.type == "cuda" or torch.compiler.is_compiling():
            return max_seqlen
    elif torch.compiler.is_compiling():
        return total
    lengths = cu[1:] - cu[:-1]
    first, last, bad, longest = torch.stack([
        cu[0], cu[-1], (lengths < 0).sum().to(cu.dtype), lengths.max() if lengths.numel() else cu[0] * 0,
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
    return rows

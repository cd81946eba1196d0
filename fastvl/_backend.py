"""Backend selection: which implementation an op runs for given tensors."""
import contextlib
import os
import warnings

BACKENDS = ("triton", "native", "reference")
_override = None


class FallbackWarning(UserWarning):
    """Ops run their reference implementation because the Triton kernels do not cover the inputs."""


_warned = set()  # fallback messages already given


def fallback(message):
    """Warn once per distinct ``message`` (a FallbackWarning) that the reference runs instead of the kernels."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, FallbackWarning, stacklevel=3)


def report_reference(device, user):
    """Warn once (naming ``user``) when the automatic choice runs ``device``'s tensors on the reference."""
    device = getattr(device, "type", device)
    if get_backend() is None and resolve(device) == "reference":
        fallback(f"{user}: {device} tensors run the reference implementations; the Triton kernels need CUDA "
                 "tensors (or TRITON_INTERPRET=1 set before fastvl is imported, for the CPU interpreter)")


def _check(name, source):
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}")
    return None if name == "auto" else name


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def set_backend(name: str | None) -> None:
    """Force every op onto ``name`` ('triton', 'native' or 'reference'); None or 'auto' restores the automatic choice."""
    global _override
    _override = None if name is None else _check(name, "set_backend")


def get_backend() -> str | None:
    """The forced backend, from set_backend() or else FASTVL_BACKEND; None when automatic."""
    if _override is not None:
        return _override
    env = os.environ.get("FASTVL_BACKEND", "auto") or "auto"
    return _check(env, "FASTVL_BACKEND")


@contextlib.contextmanager
def use_backend(name: str | None):
    """Context manager form of set_backend()."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def resolve(device) -> str:
    """The backend an op runs on tensors of ``device``.

    Automatic: Triton for CUDA tensors, and for CPU tensors when TRITON_INTERPRET=1 (the
    interpreter); else the native CPU backend (fastvl._C) when built; the plain-PyTorch reference otherwise.
    """
    from . import _native

    forced = get_backend()
    on_cuda = getattr(device, "type", device) == "cuda"
    on_cpu = getattr(device, "type", device) == "cpu"
    if forced == "native" and not (on_cpu and _native.available()):
        raise RuntimeError(f"backend 'native' needs CPU tensors and the built extension fastvl._C ({_native.ERROR})"
                           if on_cpu else "backend 'native' runs CPU tensors only")
    if forced == "triton" and not (on_cuda or interpreting()):
        raise RuntimeError(
            "backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before fastvl is imported "
            "to run the kernels on CPU through the Triton interpreter"
        )
    if forced is not None:
        return forced
    if on_cuda or interpreting():
        return "triton"
    return "native" if on_cpu and _native.available() else "reference"

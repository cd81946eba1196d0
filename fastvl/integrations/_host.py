"""Index tensors built on the host once per forward, then shipped to the device in one copy."""
import torch


def to_device(device, *tensors):
    """The CPU integer ``tensors`` on ``device``, same shapes and dtypes.

    On CUDA they travel as one pinned, asynchronous copy: no stream synchronisation.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return tensors
    flat = torch.cat([t.reshape(-1).to(torch.int64) for t in tensors])
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return tuple(out)

"""The one tolerance measure of the parity tests."""
import torch


def rel_err(a, b) -> float:
    """max |a - b| / max |b|, computed in float64 (tensors, detached, on any device; arrays; numbers). A reference
    that is all zeros divides by 1e-30 instead, so only an exact match gives a small error."""
    a, b = (torch.as_tensor(x.detach() if isinstance(x, torch.Tensor) else x).double().cpu() for x in (a, b))
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-30))

"""Shared numerics for the tests (DESIGN.md, "Numerics and tests")."""

import torch

# Relative-norm error bounds against a float64 reference.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or Inf anywhere in `out` returns inf, so it never passes."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out64.shape == ref64.shape, f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}"
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out, ref, dtype=None, tol=None):
    tol = tol if tol is not None else TOL[dtype or out.dtype]
    err = rel_err(out, ref)
    assert err < tol, f"relative error {err:.3g} >= {tol:g}"


def poisoned(shape, dtype, device):
    """An output buffer full of NaN, so any element a kernel fails to write fails the test."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)

"""Shared numerics for the tests (DESIGN.md, "Numerics and tests")."""

import torch

# Relative-norm error bounds against a float64 reference, for every kernel and backend path:
# the largest error measured on CPU (interpreter, this suite's seeded inputs) with a margin of
# 5-10x, so a bug that moves the result by a fraction of a percent fails. Measured maxima:
#   fp16: dense MoE 4.0e-4, attention 3.0e-4, quantized matmul / MoE 2.4e-4 (against the float64
#         dequantization of tests/reference64.py, which reproduces the FP8 activation rounding),
#         qk prologue 2.1e-4; torch backend's fp16 MoE 7.5e-4 (it rounds its intermediates).
#         About one rounding of the fp16 output (2^-11 relative, ~2.5e-4 in norm).
#   fp32: 4.4e-7 (dense paths), 1.2e-6 (fp8_block MoE: an e4m3 rounding of h that flips).
#   bf16: GPU only, not measured here; its rounding is 8x fp16's (2^-8), so ~2e-3 is expected.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Hopper's FP8 MMA accumulates with fewer bits than fp32 inside a K step (the kernels promote to
# fp32 after each step of at most 128 products; DeepGEMM reports about 14 bits), which fp32
# activations would otherwise be held to. An estimate, not yet measured on a GPU: the
# interpreter's FP8 products are exact.
FP8_GPU_TOL = 1e-3


def quant_tol(dtype, fp8: bool, device) -> float:
    """TOL[dtype], loosened to FP8_GPU_TOL for FP8 GEMMs on a GPU."""
    on_gpu = torch.device(device).type == "cuda"
    return max(TOL[dtype], FP8_GPU_TOL) if fp8 and on_gpu else TOL[dtype]


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

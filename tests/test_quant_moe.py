"""Quantized experts (FP8, INT4) in the Triton grouped MoE GEMMs and in both op backends.

The reference is tests/reference64.quant_moe64: a float64 loop over (token, choice) pairs with
the expert weights dequantized from their packed bytes and scales and the activations the
format really multiplies (FP8: x and the SwiGLU output quantized per token or per 1x128 group,
restated there; the router weight on the GEMM result), independent of llama4_fast.quant.
Bounds are helpers.TOL (measured). Outputs are NaN-poisoned; interpreter shapes are tiny.
"""

import pytest
import torch
from helpers import assert_close, poisoned, quant_tol, rel_err
from reference64 import quant_matmul64, quant_moe64

from llama4_fast import ops, registry
from llama4_fast.kernels import fused_moe, moe
from llama4_fast.kernels.gemm import GemmConfig
from llama4_fast.kernels.moe import MoeConfig
from llama4_fast.quant import Fp8Weight, Int4Weight, expert_kernel_args

FORMATS = [("fp8", "channel"), ("fp8", "tensor"), ("fp8", "block"), ("int4", True), ("int4", False)]
GROUP = 32


def quantize_experts(kind, option, w, group=GROUP):
    if kind == "fp8":
        return Fp8Weight.quantize(w, option, act_scale_ub=3.0 if option == "tensor" else None)
    return Int4Weight.quantize(w, group, symmetric=option)


def make_inputs(T, E, H, I, top_k, kind, option, dtype=torch.float16, device="cpu", group=GROUP):
    x = torch.randn(T, H, device=device).to(dtype)
    w13 = quantize_experts(kind, option, torch.randn(E, H, 2 * I, device=device) * H ** -0.5, group)
    w2 = quantize_experts(kind, option, torch.randn(E, I, H, device=device) * I ** -0.5, group)
    ids = torch.stack([torch.randperm(E, device=device)[:top_k] for _ in range(T)]).int()
    weights = torch.rand(T, top_k, device=device) + 0.5
    return x, w13, w2, weights, ids


def run(x, w13, w2, weights, ids, on_input=True, config=None):
    out = poisoned(x.shape, x.dtype, x.device)
    res = fused_moe(x, w13.tensors()[0], w2.tensors()[0], weights, ids, apply_router_weight_on_input=on_input,
                    out=out, config=config, **expert_kernel_args(w13, w2))
    assert res.data_ptr() == out.data_ptr()
    return res


# T * top_k <= 64: the direct (decode) path; 70 pairs: dispatch metadata. H, I are not
# multiples of 128 (fp8 blocks) nor of the tiles.
@pytest.mark.parametrize("kind,option", FORMATS)
@pytest.mark.parametrize("T,E,top_k", [(1, 4, 1), (5, 3, 2), (70, 8, 1)])
def test_quantized_experts_match_float64(device, kind, option, T, E, top_k):
    x, w13, w2, weights, ids = make_inputs(T, E, 64, 96, top_k, kind, option, device=device)
    assert_close(run(x, w13, w2, weights, ids), quant_moe64(x, w13, w2, weights, ids))


# Several K steps inside one scale group (forced 32-deep steps) in both GEMMs: INT4 groups of 128
# (H = 256, I = 128) and 64 (H = 192, I = 128); FP8 128-blocks with H = 320 and I = 160, so each
# GEMM's K ends in a partial block, and 2I = 320 columns end in a partial N block. T = 1 and 16
# (top-1) take the direct path (all pairs in one row block of 16), T = 40 top-2 the sorted one.
@pytest.mark.parametrize("kind,option,group,H,I,T,top_k,block_m", [
    ("int4", True, 128, 256, 128, 1, 1, 16),
    ("int4", True, 128, 256, 128, 40, 2, 32),
    ("int4", False, 64, 192, 128, 16, 1, 16),
    ("fp8", "block", 128, 320, 160, 1, 1, 16),
    ("fp8", "block", 128, 320, 160, 16, 1, 16),
    ("fp8", "block", 128, 320, 160, 40, 2, 32),
    ("fp8", "channel", 128, 320, 160, 16, 1, 16),
])
def test_k_steps_inside_one_scale_group(device, kind, option, group, H, I, T, top_k, block_m):
    x, w13, w2, weights, ids = make_inputs(T, 4, H, I, top_k, kind, option, device=device, group=group)
    cfg = MoeConfig(block_m, GemmConfig(64, 32, 2, 4, 2), GemmConfig(64, 32, 2, 4, 2))
    assert cfg.direct(T * top_k) == (T <= 16)
    assert_close(run(x, w13, w2, weights, ids, config=cfg), quant_moe64(x, w13, w2, weights, ids))


def test_config_override_is_validated():
    x, w13, w2, weights, ids = make_inputs(3, 4, 128, 64, 1, "int4", False)
    good = MoeConfig(16, GemmConfig(16, 32, 1, 4, 2), GemmConfig(16, 32, 1, 4, 2))
    cases = [
        (MoeConfig(16, GemmConfig(16, 64, 1, 4, 2), good.down), "gate_up.block_k"),  # 64 > the int4 group of 32
        (MoeConfig(16, good.gate_up, GemmConfig(16, 16, 1, 4, 2)), "down.block_k"),  # < 32: two dots of 16
        (MoeConfig(8, good.gate_up, good.down), "block_m"),
        (MoeConfig(16, good.gate_up, GemmConfig(24, 32, 1, 4, 2)), "down.block_n"),
        (MoeConfig(16, GemmConfig(16, 32, 1, 4, 2, 0), good.down), "split_k"),
    ]
    for cfg, match in cases:
        with pytest.raises(ValueError, match=match):
            run(x, w13, w2, weights, ids, config=cfg)
    with pytest.raises(TypeError, match="MoeConfig"):
        run(x, w13, w2, weights, ids, config=good.gate_up)
    f13, f2 = (quantize_experts("fp8", "block", torch.randn(4, *s)) for s in ((128, 128), (64, 128)))
    with pytest.raises(ValueError, match="block_k"):  # a step past one fp8 128-block
        run(x, f13, f2, weights, ids, config=MoeConfig(16, GemmConfig(16, 256, 1, 4, 2), good.down))
    assert_close(run(x, w13, w2, weights, ids, config=good), quant_moe64(x, w13, w2, weights, ids))


@pytest.mark.parametrize("kind,option", [("fp8", "channel"), ("int4", False)])
@pytest.mark.parametrize("T", [12, 70])
def test_all_tokens_on_one_expert_fp32_and_output_weighting(device, kind, option, T):
    x, w13, w2, weights, _ = make_inputs(T, 6, 64, 32, 1, kind, option, torch.float32, device)
    ids = torch.full((T, 1), 4, dtype=torch.int32, device=device)  # the other 5 experts get nothing
    tol = quant_tol(torch.float32, kind == "fp8", device)
    for on_input in (True, False):
        assert_close(run(x, w13, w2, weights, ids, on_input), quant_moe64(x, w13, w2, weights, ids, on_input), tol=tol)


@pytest.mark.parametrize("kind,option", [("fp8", "block"), ("int4", True)])
@pytest.mark.parametrize("T,top_k,block_m,splits", [(1, 1, 16, (2, 3)), (40, 2, 16, (3, 2))])
def test_split_k_with_quantized_experts(device, kind, option, T, top_k, block_m, splits):
    """Splits cut K at whole steps, and steps never straddle a scale group."""
    x, w13, w2, weights, ids = make_inputs(T, 5, 128, 64, top_k, kind, option, device=device)
    kw = expert_kernel_args(w13, w2)
    quant = moe.quant_experts_args(x, w13.tensors()[0], w2.tensors()[0], **kw)
    cfg = MoeConfig(block_m, GemmConfig(16, GROUP, 2, 4, 2, splits[0]), GemmConfig(32, GROUP, 2, 4, 2, splits[1]))
    out = poisoned(x.shape, x.dtype, device)
    moe._launch(x, w13.tensors()[0], w2.tensors()[0], weights, ids, True, out, cfg, quant)
    assert_close(out, quant_moe64(x, w13, w2, weights, ids))


@pytest.mark.parametrize("kind,option", FORMATS)
@pytest.mark.parametrize("T,top_k,block_m,splits", [(1, 1, 16, (2, 3)), (40, 2, 16, (1, 1))])
def test_tma_with_quantized_experts(device, kind, option, T, top_k, block_m, splits):
    """MoeConfig.tma: FP8 expert weights (K-contiguous, tiles of the transpose) and packed INT4
    ones (N-contiguous, half-height tiles) through TMA descriptors, h (FP8-quantized or not) in
    expert order for the down GEMM; I = 96 and H = 160 end in partial 64-column tiles."""
    from llama4_fast.kernels import device as kernel_device
    x, w13, w2, weights, ids = make_inputs(T, 5, 160, 96, top_k, kind, option, device=device)
    q13, q2 = w13.tensors()[0], w2.tensors()[0]
    rows = GROUP // 2 if kind == "int4" else GROUP
    for q in (q13, q2):  # these shapes really go through TMA
        desc, transposed = kernel_device.weight_descriptor(q, rows, 64)
        assert desc is not None and transposed == (kind == "fp8")
    quant = moe.quant_experts_args(x, q13, q2, **expert_kernel_args(w13, w2))
    cfg = MoeConfig(block_m, GemmConfig(64, GROUP, 2, 4, 2, splits[0]), GemmConfig(64, GROUP, 2, 4, 2, splits[1]),
                    tma=True, epilogue_block_n=16)
    out = poisoned(x.shape, x.dtype, device)
    moe._launch(x, q13, q2, weights, ids, True, out, cfg, quant)
    assert_close(out, quant_moe64(x, w13, w2, weights, ids), tol=quant_tol(x.dtype, kind == "fp8", device))


@pytest.mark.parametrize("kind,option", [("fp8", "channel"), ("int4", False)])
def test_op_backends_agree(device, kind, option):
    x, w13, w2, weights, ids = make_inputs(9, 4, 64, 32, 2, kind, option, device=device)
    ref = quant_moe64(x, w13, w2, weights, ids)
    with registry.use(fused_moe="torch"):
        assert_close(ops.fused_moe(x, w13, w2, weights, ids), ref)
    with registry.record() as calls:
        assert_close(ops.fused_moe(x, w13, w2, weights, ids), ref)
    assert calls[("fused_moe", "triton")] == 1


def test_rejects_mismatched_or_malformed_experts():
    x, w13, w2, weights, ids = make_inputs(3, 4, 64, 32, 1, "int4", False)
    f8 = Fp8Weight.quantize(torch.randn(4, 32, 64))
    with pytest.raises(TypeError, match="both"):
        ops.fused_moe(x, w13, f8, weights, ids)
    with pytest.raises(TypeError, match="both"):
        ops.fused_moe(x, w13, w2.dequantize(), weights, ids)
    sym = Int4Weight.quantize(torch.randn(4, 32, 64), GROUP)
    with pytest.raises(ValueError, match="one quantization format"):
        ops.fused_moe(x, w13, sym, weights, ids)
    with pytest.raises(ValueError, match="gate_up_proj"):  # H mismatch
        ops.fused_moe(x[:, :32], w13, w2, weights, ids)
    with pytest.raises(ValueError, match="topk_ids"):
        ops.fused_moe(x, w13, w2, weights, ids + 4)
    kw = expert_kernel_args(w13, w2)
    with pytest.raises(ValueError, match="down_proj scale"):
        fused_moe(x, w13.packed, w2.packed, weights, ids, **dict(kw, down_scale=kw["down_scale"][..., :1]))
    with pytest.raises(ValueError, match="both be given"):
        fused_moe(x, w13.packed, w2.packed, weights, ids, **dict(kw, down_zero=None))
    f13, f2 = Fp8Weight.quantize(torch.randn(4, 64, 64)), Fp8Weight.quantize(torch.randn(4, 32, 64))
    with pytest.raises(ValueError, match="act_scale_ub"):
        fused_moe(x, f13.qweight, f2.qweight, weights, ids, **dict(expert_kernel_args(f13, f2), act_scale_ub=0.0))


@pytest.mark.gpu
@pytest.mark.parametrize("kind,option", FORMATS)
def test_bf16_real_shapes_gpu(kind, option):
    """Scout TP8 shapes (E=16, H=5120, I=1024), group 128, decode and a prefill batch."""
    E, H, I = 16, 5120, 1024
    for T in (1, 300):
        x, w13, w2, weights, ids = make_inputs(T, E, H, I, 1, kind, option, torch.bfloat16, "cuda", group=128)
        assert_close(run(x, w13, w2, weights, ids), quant_moe64(x, w13, w2, weights, ids))


@pytest.mark.gpu
@pytest.mark.parametrize("kind,option", [("fp8", "channel"), ("int4", True)])
def test_quantized_decode_step_captures_in_cuda_graph(kind, option):
    """route + quantized fused_moe + quant_linear launch without host synchronisation."""
    from llama4_fast.kernels import route
    E, H, I, T = 16, 512, 1024, 4
    x, w13, w2, _, _ = make_inputs(T, E, H, I, 1, kind, option, torch.bfloat16, "cuda")
    lin = quantize_experts(kind, option, torch.randn(H, 256, device="cuda") * H ** -0.5)
    logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)

    def step():
        weights, ids = route(logits, 1)
        return ops.fused_moe(x, w13, w2, weights, ids), ops.quant_linear(x, lin)

    eager = step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)
    weights, ids = route(logits, 1)  # and not only consistent: right
    assert_close(captured[0], quant_moe64(x, w13, w2, weights, ids))
    assert_close(captured[1], quant_matmul64(x, lin))


@pytest.mark.parametrize("kind,option", [("fp8", "channel"), ("int4", False)])
def test_quantized_ops_trace_whole_in_torch_compile(device, kind, option):
    """Format objects pass through ops.fused_moe / ops.quant_linear without graph breaks
    (fullgraph); on a GPU with inductor and CUDA graphs (reduce-overhead), on CPU with the
    eager backend (the custom ops run the interpreter kernels)."""
    x, w13, w2, _, _ = make_inputs(4, 4, 64, 32, 1, kind, option, device=device)
    lin = quantize_experts(kind, option, torch.randn(64, 48, device=device) * 0.125)
    router = torch.randn(64, 4, device=device).to(x.dtype)

    def step(x):
        weights, ids = ops.route(x @ router, 1)
        return ops.fused_moe(x, w13, w2, weights, ids), ops.quant_linear(x, lin)

    eager = step(x)
    weights, ids = ops.route(x @ router, 1)
    assert_close(eager[0], quant_moe64(x, w13, w2, weights, ids))
    assert_close(eager[1], quant_matmul64(x, lin))
    on_gpu = device == "cuda"
    compiled = torch.compile(step, fullgraph=True, **({"mode": "reduce-overhead"} if on_gpu else {"backend": "eager"}))
    for _ in range(3 if on_gpu else 1):  # GPU: warm-up, then CUDA-graph replays
        out = compiled(x)
    for a, b in zip(out, eager):
        assert torch.equal(a, b) if not on_gpu else rel_err(a, b) < 1e-2  # inductor may fuse x @ router

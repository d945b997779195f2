"""FP8 / INT4 formats (llama4_fast.quant) and the Triton dequant-matmul (kernels/quant_matmul.py).

References are tests/reference64.py's float64 products of the weight dequantized from its
packed bytes and scales with the activations the format really multiplies (FP8: x quantized
per token or per 1x128 group, restated there), independent of llama4_fast.quant; the bounds are
helpers.TOL (measured). Interpreter shapes are tiny; activations fp16/fp32 (bf16 dots are wrong
in the interpreter, see DESIGN.md). K and N are chosen not to be multiples of the tiles or
blocks, and forced tiles (`config=`) put several K steps inside one scale group.
"""

import importlib

import pytest
import torch
from helpers import assert_close, poisoned, quant_tol, rel_err
from reference64 import quant_matmul64, quantize_fp8_act64

from llama4_fast.quant import Fp8Weight, Int4Weight, pack_int4, quantize_fp8_activations_ref, unpack_int4

qm = importlib.import_module("llama4_fast.kernels.quant_matmul")  # the package exports a same-named function

FORMATS = [("fp8", "channel"), ("fp8", "tensor"), ("fp8", "block"), ("int4", True), ("int4", False)]


def make_weight(kind, option, K, N, device, group_size=32):
    w = torch.randn(K, N, device=device) * K ** -0.5
    if kind == "fp8":
        return w, Fp8Weight.quantize(w, option, act_scale_ub=2.5 if option == "tensor" else None)
    return w, Int4Weight.quantize(w, group_size, symmetric=option)


def run(x, W, out=None, config=None):
    tensors = dict(zero=W.zero, group_size=W.group_size) if isinstance(W, Int4Weight) else \
        dict(act_scale_ub=W.act_scale_ub)
    q = W.packed if isinstance(W, Int4Weight) else W.qweight
    return qm.quant_matmul(x, q, W.scale, weight_format=W.kernel_format, out=out, config=config, **tensors)


# -- formats ---------------------------------------------------------------------------------

def test_pack_unpack_round_trip():
    u = torch.randint(0, 16, (3, 10, 7), dtype=torch.uint8)
    packed = pack_int4(u)
    assert packed.shape == (3, 5, 7) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), u)
    assert torch.equal(packed[0, 0, 0] & 0xF, u[0, 0, 0]) and torch.equal(packed[0, 0, 0] >> 4, u[0, 1, 0])
    with pytest.raises(ValueError, match="even"):
        pack_int4(u[:, :9])
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(u.int() + 1)


@pytest.mark.parametrize("kind,option", FORMATS)
def test_quantize_dequantize_is_close_and_idempotent(kind, option):
    w, W = make_weight(kind, option, 256, 72, "cpu")
    err = rel_err(W.dequantize(), w)
    assert err < (0.04 if kind == "fp8" else 0.15), err  # e4m3: ~2.6%; int4: ~8-11% (README table)
    again = type(W).quantize(W.dequantize(), **({"granularity": option} if kind == "fp8" else
                                                 {"group_size": 32, "symmetric": option}))
    assert rel_err(again.dequantize(), W.dequantize()) < 1e-6  # the grid maps onto itself


def test_expert_weights_keep_a_leading_dimension():
    w = torch.randn(3, 64, 40)
    for W in (Fp8Weight.quantize(w), Fp8Weight.quantize(w, "block"), Int4Weight.quantize(w, 32, symmetric=False)):
        assert W.shape == (3, 64, 40)
        for e in range(3):
            assert torch.equal(W.expert(e).dequantize(), W.dequantize()[e])
            assert rel_err(W.expert(e).dequantize(), w[e]) < 0.15


# -- activation quantization -------------------------------------------------------------------

@pytest.mark.parametrize("group_size,ub", [(None, None), (None, 1.5), (128, None)])
def test_fp8_activation_quantization_matches_torch(device, group_size, ub):
    x = torch.randn(5, 300, device=device).half() * 3
    x[2] = 0.0  # an all-zero token keeps a finite scale
    x[3, 7] = 1e-3  # subnormal e4m3 range after scaling
    q, s = qm.quantize_fp8_activations(x, group_size=group_size, scale_ub=ub)
    qr, sr = quantize_fp8_activations_ref(x, group_size, ub)
    assert torch.equal(s, sr)
    assert torch.equal(q.float(), qr.float())
    q64, s64 = quantize_fp8_act64(x, group_size, ub)  # the rounding restated in float64
    assert torch.equal(q.double().cpu(), q64) and torch.equal(s.double().cpu().reshape(s64.shape), s64)
    if ub is not None:
        assert (s <= ub / 448 + 1e-9).all() and q.float().abs().max() == 448  # outliers saturate


# -- the dense kernel against float64 ------------------------------------------------------------

@pytest.mark.parametrize("kind,option", FORMATS)
@pytest.mark.parametrize("M,K,N,dtype", [
    (1, 192, 200, torch.float16),   # decode; N not a multiple of the tile, K not of 128
    (7, 256, 48, torch.float32),    # decode, fp32 activations
    (40, 128, 72, torch.float16),   # tiled path
])
def test_quant_matmul_matches_float64(device, kind, option, M, K, N, dtype):
    x = torch.randn(M, K, device=device).to(dtype)
    _, W = make_weight(kind, option, K, N, device)
    out = poisoned((M, N), dtype, device)
    res = run(x, W, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert_close(res, quant_matmul64(x, W), tol=quant_tol(dtype, kind == "fp8", device))


# Several K steps inside one scale group (forced 32-deep steps): INT4 groups of 64 and 128, FP8
# 128-blocks with K ending in a partial block (320 = 2.5 blocks), with and without split K (3
# splits of 8 steps cut the int4 groups of 128 at k = 96). M = 1 (decode), 16, 40 (three row tiles).
@pytest.mark.parametrize("kind,option,group,K", [("int4", True, 128, 256), ("int4", False, 64, 192),
                                                  ("fp8", "block", 128, 320), ("fp8", "channel", 128, 320)])
@pytest.mark.parametrize("M,split", [(1, 3), (16, 1), (40, 1)])
def test_k_steps_inside_one_scale_group(device, kind, option, group, K, M, split):
    N = 40
    x = torch.randn(M, K, device=device).half()
    _, W = make_weight(kind, option, K, N, device, group_size=group)
    cfg = qm.MatmulConfig(block_m=16, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=2, split_k=split)
    assert_close(run(x, W, out=poisoned((M, N), x.dtype, device), config=cfg), quant_matmul64(x, W))


@pytest.mark.parametrize("kind,option", FORMATS)
@pytest.mark.parametrize("M,split", [(1, 3), (40, 1)])
def test_tma_matches_float64(device, kind, option, M, split):
    """MatmulConfig.tma: the activations and the weight through TMA descriptors (FP8 weights are
    K-contiguous: a descriptor over the transpose; packed INT4 rows: half a K step), N (80) no
    multiple of the tile, K (320) no multiple of 128."""
    from llama4_fast.kernels import device as kernel_device
    K, N = 320, 80
    x = torch.randn(M, K, device=device).half()
    _, W = make_weight(kind, option, K, N, device)
    q = W.packed if isinstance(W, Int4Weight) else W.qweight
    assert kernel_device.weight_descriptor(q, 16, 32)[0] is not None  # the weights really go through TMA
    cfg = qm.MatmulConfig(block_m=16, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=2, split_k=split,
                          tma=True)
    assert_close(run(x, W, out=poisoned((M, N), x.dtype, device), config=cfg), quant_matmul64(x, W),
                 tol=quant_tol(x.dtype, kind == "fp8", device))


def test_config_override_is_validated():
    x = torch.randn(2, 128).half()
    w = torch.randn(128, 24)
    i4, f8 = Int4Weight.quantize(w, 64), Fp8Weight.quantize(w, "block")
    good = qm.MatmulConfig(16, 16, 32, 1, 4, 2, 1)
    cases = [
        (i4, good._replace(block_k=128), "divid"),  # a step would straddle two int4 groups of 64
        (i4, good._replace(block_k=16), ">= 32"),  # int4 steps hold two nibble-plane dots of 16
        (f8, good._replace(block_k=256), "divid"),  # past one fp8 block
        (f8, good._replace(block_m=8), "block_m"),
        (f8, good._replace(block_n=48), "block_n"),
        (f8, good._replace(split_k=0), "split_k"),
        (f8, good._replace(num_warps=3), "num_warps"),
        (f8, good._replace(tma="yes"), "config.tma"),
    ]
    for W, cfg, match in cases:
        with pytest.raises(ValueError, match=match):
            run(x, W, config=cfg)
    with pytest.raises(TypeError, match="MatmulConfig"):
        run(x, f8, config=tuple(good))
    assert_close(run(x, i4, config=good), quant_matmul64(x, i4))


@pytest.mark.parametrize("kind,option", [("fp8", "channel"), ("fp8", "block"), ("int4", False)])
def test_split_k_decode_path(device, monkeypatch, kind, option):
    """As on a 132-SM GPU: few column tiles, so K is split and the partials summed."""
    monkeypatch.setattr(qm, "num_sms", lambda dev: 132)
    M, K, N = 3, 1024, 40
    x = torch.randn(M, K, device=device).half()
    _, W = make_weight(kind, option, K, N, device)
    code = qm.format_code(W.kernel_format, getattr(W, "zero", None))
    assert qm.launch_config(M, N, K, code, 32, 132).split_k > 1
    assert_close(run(x, W, out=poisoned((M, N), x.dtype, device)), quant_matmul64(x, W))


def test_nn_linear_layout_and_empty_batch(device):
    """An [N, K] K-contiguous fp8 weight passes as its transpose; M = 0 returns [0, N]."""
    lin = torch.randn(24, 64, device=device)  # nn.Linear weight [N, K]
    W = Fp8Weight.quantize(lin.t())
    assert W.qweight.t().is_contiguous()
    x = torch.randn(4, 64, device=device).half()
    assert_close(run(x, W), quant_matmul64(x, W))
    assert run(x[:0], W).shape == (0, 24)


def test_empty_k_is_an_empty_sum(device):
    x, N = torch.randn(3, 0, device=device).half(), 24
    fp8 = torch.empty(0, N, dtype=torch.float8_e4m3fn, device=device)
    nibbles = torch.empty(0, N, dtype=torch.uint8, device=device)
    for q, scale, fmt, zero in [(fp8, torch.ones(N, device=device), "fp8_rowwise", None),
                                (fp8, torch.ones(0, 1, device=device), "fp8_block", None),
                                (nibbles, torch.ones(0, N, device=device), "int4", None),
                                (nibbles, torch.ones(0, N, device=device), "int4", nibbles)]:
        out = poisoned((3, N), torch.float16, device)
        qm.quant_matmul(x, q, scale, weight_format=fmt, zero=zero, group_size=32, out=out)
        assert torch.equal(out, torch.zeros_like(out)), fmt
    xq, scale = qm.quantize_fp8_activations(x)
    assert xq.shape == (3, 0) and torch.equal(scale, torch.full((3,), qm.MIN_FP8_SCALE, device=device))


# -- bad input -----------------------------------------------------------------------------------

def test_rejects_bad_formats_and_shapes():
    x = torch.randn(2, 64).half()
    w = torch.randn(64, 24)
    f8, i4 = Fp8Weight.quantize(w), Int4Weight.quantize(w, 32)
    cases = [
        (dict(qweight=f8.qweight, scale=f8.scale[:-1], weight_format="fp8_rowwise"), ValueError, "scale"),
        (dict(qweight=f8.qweight, scale=torch.ones(2, 1), weight_format="fp8_block"), ValueError, "128x128"),
        (dict(qweight=f8.qweight, scale=f8.scale.half(), weight_format="fp8_rowwise"), TypeError, "scale"),
        (dict(qweight=i4.packed, scale=i4.scale[:, :-1], weight_format="int4", group_size=32), ValueError, "scale"),
        (dict(qweight=i4.packed, scale=i4.scale, weight_format="int4", group_size=64), ValueError, "scale"),
        (dict(qweight=i4.packed, scale=i4.scale, weight_format="int4", group_size=48), ValueError, "power of two"),
        (dict(qweight=i4.packed, scale=i4.scale, weight_format="int4", group_size=32,
              zero=torch.zeros(1, 24, dtype=torch.uint8)), ValueError, "zero"),
        (dict(qweight=i4.packed.int(), scale=i4.scale, weight_format="int4", group_size=32), TypeError, "qweight"),
        (dict(qweight=i4.packed, scale=i4.scale, weight_format="int8"), ValueError, "weight_format"),
        (dict(qweight=f8.qweight, scale=f8.scale, weight_format="fp8_rowwise", zero=i4.packed), ValueError, "zero"),
        (dict(qweight=f8.qweight[:32], scale=f8.scale, weight_format="fp8_rowwise"), ValueError, "qweight"),
        (dict(qweight=f8.qweight, scale=f8.scale, weight_format="fp8_rowwise", out=torch.empty(2, 25)),
         ValueError, "out"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            qm.quant_matmul(x, **kwargs)
    # K not a multiple of the group, or odd: the format cannot represent it
    with pytest.raises(ValueError, match="multiple of group_size"):
        Int4Weight.quantize(torch.randn(48, 8), 32)
    with pytest.raises(ValueError, match="K must be even"):
        qm.quant_matmul(torch.randn(2, 63), torch.zeros(31, 8, dtype=torch.uint8), torch.ones(1, 8),
                        weight_format="int4", group_size=16)
    for bad in (0.0, -1.0, float("nan"), float("inf")):  # would saturate every activation, or worse
        with pytest.raises(ValueError, match="act_scale_ub"):
            qm.quant_matmul(x, f8.qweight, f8.scale, weight_format="fp8_rowwise", act_scale_ub=bad)
        with pytest.raises(ValueError, match="scale_ub"):
            qm.quantize_fp8_activations(x, scale_ub=bad)
    with pytest.raises(ValueError, match="granularity"):
        Fp8Weight.quantize(w, "row")
    with pytest.raises(ValueError, match="scale"):
        Fp8Weight(f8.qweight, f8.scale[None])


# -- GPU: real shapes in bf16 --------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("kind,option", FORMATS)
@pytest.mark.parametrize("M", [1, 16, 300])
def test_bf16_real_shapes_gpu(kind, option, M):
    K, N = 5120, 1024
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    _, W = make_weight(kind, option, K, N, "cuda", group_size=128)
    out = poisoned((M, N), torch.bfloat16, "cuda")
    assert_close(run(x, W, out=out), quant_matmul64(x, W))


# -- the op: both backends -------------------------------------------------------------------------

@pytest.mark.parametrize("kind,option", FORMATS)
def test_quant_linear_op_backends_agree(device, kind, option):
    from llama4_fast import ops, registry
    x = torch.randn(6, 96, device=device).half()
    _, W = make_weight(kind, option, 96, 40, device)
    with registry.use(quant_linear="torch"):
        ref = ops.quant_linear(x, W)
    with registry.record() as calls:
        got = ops.quant_linear(x, W)
    assert calls[("quant_linear", "triton")] == 1
    assert ref.dtype == got.dtype == torch.float16
    assert_close(ref, quant_matmul64(x, W))
    assert_close(got, quant_matmul64(x, W))
    with pytest.raises(ValueError, match="weight must be"):
        ops.quant_linear(x[:, :64], W)
    with pytest.raises(TypeError, match="Fp8Weight or Int4Weight"):
        ops.quant_linear(x, W.dequantize())

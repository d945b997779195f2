"""The Triton fused MoE (`llama4_fast.kernels.fused_moe`) against a float64 reference.

The reference is tests/reference64.moe64: a dense float64 loop over tokens and their chosen
experts, independent of the code under test. Outputs are NaN-poisoned `out=` buffers, so unwritten rows fail.
On CPU the kernels run through the Triton interpreter: small H/I, fp16/fp32.
"""

from dataclasses import replace

import pytest
import torch
from helpers import TOL, assert_close, poisoned, rel_err
from reference64 import experts64
from reference64 import moe64 as ref_moe

from llama4_fast.kernels import device as kernel_device
from llama4_fast.kernels import fused_moe, moe
from llama4_fast.kernels.gemm import GemmConfig
from llama4_fast.kernels.moe import MoeConfig


def make_inputs(T, E, H, I, top_k, dtype, device):
    """Activations, unit-scale experts, router weights in [0.5, 1.5) and distinct random
    expert ids per token (int32)."""
    x = torch.randn(T, H, device=device).to(dtype)
    w13 = (torch.randn(E, H, 2 * I, device=device) * H ** -0.5).to(dtype)
    w2 = (torch.randn(E, I, H, device=device) * I ** -0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, device=device)[:top_k] for _ in range(T)]) if T else \
        torch.empty(0, top_k, dtype=torch.int64, device=device)
    weights = torch.rand(T, top_k, device=device) + 0.5
    return x, w13, w2, weights, ids.to(torch.int32)


def run_and_check(x, w13, w2, weights, ids, on_input=True):
    out = poisoned(x.shape, x.dtype, x.device)
    res = fused_moe(x, w13, w2, weights, ids, apply_router_weight_on_input=on_input, out=out)
    assert res.data_ptr() == out.data_ptr() and res.dtype == x.dtype
    assert_close(res, ref_moe(x, w13, w2, weights, ids, on_input))
    return res


# T in {0, 1, 7, 64, 300}, E in {1, 3, 16, 128}, top_k in {1, 2, 4}; H, I are not multiples of
# any block size. T * top_k <= 16 takes the direct (decode) path, larger the sorted path
# (single-launch metadata up to 256 pairs, three launches above).
@pytest.mark.parametrize("T,E,top_k,H,I,dtype", [
    (0, 16, 1, 40, 24, torch.float32),
    (1, 1, 1, 40, 24, torch.float32),
    (1, 128, 4, 72, 48, torch.float16),
    (7, 3, 2, 72, 48, torch.float32),
    (7, 16, 1, 40, 24, torch.float16),
    (64, 16, 1, 72, 48, torch.float16),
    (64, 128, 2, 40, 24, torch.float32),
    (300, 3, 1, 40, 24, torch.float32),
    (300, 128, 1, 40, 24, torch.float16),
    (300, 16, 4, 40, 24, torch.float32),
    (300, 128, 4, 72, 48, torch.float16),
])
@pytest.mark.parametrize("on_input", [True, False])
def test_fused_moe_matches_float64(device, T, E, top_k, H, I, dtype, on_input):
    x, w13, w2, weights, ids = make_inputs(T, E, H, I, top_k, dtype, device)
    res = run_and_check(x, w13, w2, weights, ids, on_input)
    assert res.shape == (T, H)


@pytest.mark.parametrize("T", [12, 200])
def test_all_tokens_on_one_expert_others_empty(device, T):
    x, w13, w2, weights, _ = make_inputs(T, 16, 72, 48, 1, torch.float32, device)
    ids = torch.full((T, 1), 9, dtype=torch.int32, device=device)
    run_and_check(x, w13, w2, weights, ids)


def test_some_experts_without_tokens_top2(device):
    T, E = 90, 16
    x, w13, w2, weights, _ = make_inputs(T, E, 40, 24, 2, torch.float16, device)
    ids = torch.stack([torch.tensor([2, 7])[torch.randperm(2)] for _ in range(T)]).to(device)
    run_and_check(x, w13, w2, weights, ids.int())


def test_int64_ids_fp16_weights_and_strided_views(device):
    """Activations, weights and out are read/written through their strides (no copies)."""
    T, E, H, I = 20, 3, 40, 24
    x, w13, w2, weights, ids = make_inputs(T, E, H, I, 2, torch.float32, device)
    x_view = torch.randn(H, T, device=device).t()  # transposed activations
    x_view.copy_(x)
    w13_view = torch.randn(E, 2 * I, H, device=device).transpose(1, 2)  # K-contiguous weights
    w13_view.copy_(w13)
    big = poisoned((T, 2 * H), x.dtype, device)
    out_view = big[:, ::2]  # every other column
    fused_moe(x_view, w13_view, w2, weights.half(), ids.long(), out=out_view)
    assert_close(out_view, ref_moe(x, w13, w2, weights.half(), ids))
    assert torch.isnan(big[:, 1::2]).all()  # nothing outside `out` was written


def test_without_out_allocates_and_is_deterministic(device):
    x, w13, w2, weights, ids = make_inputs(64, 16, 40, 24, 2, torch.float32, device)
    a = fused_moe(x, w13, w2, weights, ids)
    b = fused_moe(x, w13, w2, weights, ids)
    assert a.shape == x.shape and a.is_contiguous()
    assert torch.equal(a, b)  # fixed summation order: bitwise reproducible
    assert_close(a, ref_moe(x, w13, w2, weights, ids))


def test_empty_batch_returns_empty(device):
    x, w13, w2, weights, ids = make_inputs(0, 4, 40, 24, 2, torch.float16, device)
    res = fused_moe(x, w13, w2, weights, ids)
    assert res.shape == (0, 40) and res.dtype == torch.float16


# -- explicit configs: split K on either GEMM, both paths, and skipped (out-of-range) ids ------

def _cfg(block_m, split_gate_up, split_down, block_k=16):
    return MoeConfig(block_m, GemmConfig(16, block_k, 2, 4, 2, split_gate_up),
                     GemmConfig(32, block_k, 2, 4, 2, split_down))


@pytest.mark.parametrize("T,top_k,block_m,splits", [
    (1, 1, 16, (3, 2)),    # direct path, both GEMMs split (TP8 decode)
    (5, 2, 16, (1, 4)),    # direct, top-2, down split (partials summed over splits and slots)
    (40, 1, 16, (2, 1)),   # sorted path, gate_up split
    (40, 2, 32, (4, 3)),   # sorted, top-2, both split; a split may get no K tiles (4 x 16 > 40)
])
def test_split_k_paths(device, T, top_k, block_m, splits):
    x, w13, w2, weights, ids = make_inputs(T, 8, 40, 24, top_k, torch.float32, device)
    for on_input in (True, False):
        out = poisoned(x.shape, x.dtype, device)
        fused_moe(x, w13, w2, weights, ids, apply_router_weight_on_input=on_input, out=out,
                  config=_cfg(block_m, *splits))
        assert_close(out, ref_moe(x, w13, w2, weights, ids, on_input))


@pytest.mark.parametrize("T,block_m", [(6, 16), (50, 16)])
def test_out_of_range_ids_are_skipped_by_the_kernel(device, T, block_m):
    """What CUDA does with bad ids (on CPU the launcher's check raises first): the pairs
    contribute nothing and every row is still written."""
    E = 5
    x, w13, w2, weights, ids = make_inputs(T, E, 40, 24, 2, torch.float32, device)
    ids[0, 0], ids[1, 1], ids[2] = -1, E, torch.tensor([E + 3, -7])  # token 2 has no valid expert
    out = poisoned(x.shape, x.dtype, device)
    moe._launch(x, w13, w2, weights, ids, True, out, _cfg(block_m, 1, 1))
    ref = ref_moe(x, w13, w2, weights, ids)
    assert_close(out, ref)
    assert out[2].abs().max().item() == 0.0
    ids1 = ids[:, :1].contiguous()  # top-1: the down GEMM writes out[token] directly
    out = poisoned(x.shape, x.dtype, device)
    moe._launch(x, w13, w2, weights[:, :1], ids1, True, out, _cfg(block_m, 2, 1))
    assert_close(out, ref_moe(x, w13, w2, weights[:, :1], ids1))



# -- TMA (MoeConfig.tma): tensor descriptors, h in expert order --------------------------------

@pytest.mark.parametrize("T,E,top_k,block_m,splits,dtype", [
    (1, 8, 1, 16, (3, 2), torch.float32),    # direct, both GEMMs split
    (5, 8, 2, 16, (1, 1), torch.float16),    # direct, top-2
    (40, 8, 1, 16, (2, 1), torch.float32),   # sorted, gate_up split: partials by slot
    (90, 3, 2, 16, (1, 3), torch.float16),   # sorted, top-2, down split
    (300, 16, 4, 32, (1, 1), torch.float32),  # sorted, top-4, experts with several row blocks
])
def test_tma_matches_float64(device, T, E, top_k, block_m, splits, dtype):
    """Weights and h through tensor descriptors (I = 24 is no multiple of the 16-wide gate tile,
    so the gate tile's last columns read up columns; H = 40 no multiple of the down tile), with
    the router weight on either side; the same answer as the pointer loads."""
    H, I = 40, 24
    x, w13, w2, weights, ids = make_inputs(T, E, H, I, top_k, dtype, device)
    for w, block in ((w13, [1, 16, 16]), (w2, [1, 16, 32])):
        assert kernel_device.tensor_descriptor(w, block) is not None  # these tests really read through TMA
    for on_input, epilogue, layout in ((True, None, "stored"), (False, 8, "linear")):
        cfg = replace(_cfg(block_m, *splits), tma=True, epilogue_block_n=epilogue)
        w = (w13, w2) if layout == "stored" else linear_style(w13, w2)  # K-contiguous: transposed tiles
        assert all(kernel_device.weight_descriptor(t, 16, 16)[1] == (layout == "linear") for t in w)
        out = poisoned(x.shape, x.dtype, device)
        fused_moe(x, *w, weights, ids, apply_router_weight_on_input=on_input, out=out, config=cfg)
        assert_close(out, ref_moe(x, w13, w2, weights, ids, on_input))
    if T > 1:  # skipped ids (what CUDA does with them): their slots' h rows are zeros, never read
        ids = ids.clone()
        ids[0, 0], ids[1] = E, torch.tensor([-1, E + 1] * top_k)[:top_k]
        out = poisoned(x.shape, x.dtype, device)
        moe._launch(x, w13, w2, weights, ids, True, out, replace(_cfg(block_m, *splits), tma=True))
        assert_close(out, ref_moe(x, w13, w2, weights, ids))
        assert out[1].abs().max().item() == 0.0


@pytest.mark.parametrize("epilogue_block_n", [8, 16, 4])  # 2, 1 and 4 pieces of the 16- and 32-wide tiles
@pytest.mark.parametrize("T,top_k,splits", [(3, 2, (2, 1)), (60, 1, (1, 1)), (60, 2, (1, 2))])
def test_epilogue_in_column_pieces(device, epilogue_block_n, T, top_k, splits):
    """The pieces cover the tile exactly once (poisoned out), with the last block's columns
    past N (H = 40, I = 24) masked; partials, final rows and h alike."""
    x, w13, w2, weights, ids = make_inputs(T, 8, 40, 24, top_k, torch.float32, device)
    cfg = replace(_cfg(16, *splits), epilogue_block_n=epilogue_block_n)
    assert cfg.epilogue_split(cfg.down) == min(4, 32 // epilogue_block_n)
    out = poisoned(x.shape, x.dtype, device)
    fused_moe(x, w13, w2, weights, ids, out=out, config=cfg)
    assert_close(out, ref_moe(x, w13, w2, weights, ids))


def test_tma_skipped_where_the_layout_does_not_allow_it(device, monkeypatch):
    """Weights whose rows are not 16-byte multiples (H = 36 halves), or K-contiguous views, get
    no descriptor and run the pointer loads; bad ids are still skipped. So does everything on a
    triton without host-side descriptors."""
    T, E, H, I = 50, 5, 36, 24
    x, w13, w2, weights, ids = make_inputs(T, E, H, I, 2, torch.float16, device)
    assert kernel_device.tensor_descriptor(w2, [1, 16, 32]) is None  # row stride 72 bytes
    assert kernel_device.tensor_descriptor(linear_style(w13, w2)[0], [1, 16, 16]) is None  # column stride H
    cfg = replace(_cfg(16, 1, 1), tma=True)
    out = poisoned(x.shape, x.dtype, device)
    fused_moe(x, w13, w2, weights, ids, out=out, config=cfg)
    assert_close(out, ref_moe(x, w13, w2, weights, ids))
    ids[0, 0], ids[3] = E, torch.tensor([-1, E + 2])
    out = poisoned(x.shape, x.dtype, device)
    moe._launch(x, *linear_style(w13, w2), weights, ids, True, out, cfg)
    assert_close(out, ref_moe(x, w13, w2, weights, ids))
    assert out[3].abs().max().item() == 0.0
    monkeypatch.setattr(kernel_device, "descriptor_class", lambda: None)
    assert "no host-side TensorDescriptor" in kernel_device.tma_unavailable(x)
    x, w13, w2, weights, ids = make_inputs(T, E, 40, I, 2, torch.float16, x.device)
    out = poisoned(x.shape, x.dtype, x.device)
    fused_moe(x, w13, w2, weights, ids, out=out, config=cfg)
    assert_close(out, ref_moe(x, w13, w2, weights, ids))


def test_hopper_options_are_checked(tmp_path, monkeypatch):
    """A config's (or the table's) tma, pdl and epilogue_block_n are checked, naming the field;
    pdl is ignored off CUDA (the interpreter has no grid dependency control)."""
    x, w13, w2, weights, ids = make_inputs(4, 3, 40, 24, 1, torch.float32, "cpu")
    for bad, field in ((dict(tma="yes"), "config.tma"), (dict(pdl=1), "config.pdl"),
                       (dict(epilogue_block_n=24), "config.epilogue_block_n")):
        with pytest.raises(ValueError, match=field):
            fused_moe(x, w13, w2, weights, ids, config=replace(_cfg(16, 1, 1), **bad))
    out = poisoned(x.shape, x.dtype, "cpu")
    fused_moe(x, w13, w2, weights, ids, out=out, config=replace(_cfg(16, 1, 1), pdl=True))
    assert_close(out, ref_moe(x, w13, w2, weights, ids))
    gemm = {"block_n": 64, "block_k": 64, "group_m": 1, "num_warps": 4, "num_stages": 3}
    table = tmp_path / "moe.json"
    table.write_text('{"E=1,H=2,I=3": [{"max_tokens_per_expert": null, "block_m": 16, "tma": 1, '
                     f'"gate_up": {gemm}, "down": {gemm}}}]}}'.replace("'", '"'))
    monkeypatch.setattr(moe, "CONFIG_FILE", table)
    moe.config_table.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"moe.json\[E=1,H=2,I=3\]\[0\].tma"):
            moe.config_table()
    finally:
        monkeypatch.undo()
        moe.config_table.cache_clear()


# -- launch configs --------------------------------------------------------------------------

def test_config_table_and_selection():
    table = moe.config_table()
    shapes = {(16, 5120, 8192), (128, 5120, 8192), (16, 5120, 1024), (128, 5120, 1024)}
    assert shapes <= set(table)
    for shape in shapes:
        bounds = [b for b, _ in table[shape]]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf")

    def pick(T, E, I, sms=132, dtype=torch.bfloat16, use_table=True):
        return moe.select_config(T, 1, E, 5120, I, dtype, num_sms=sms, use_table=use_table)

    # Rows per block follow tokens per expert, not the batch: 16 while few, 128 at prefill.
    assert pick(1, 128, 8192).block_m == pick(1024, 128, 8192).block_m == 16
    assert pick(16384, 128, 8192).block_m == pick(2048, 16, 8192).block_m == 128
    # TP8 decode: gate_up has 1024 / 64 = 16 column tiles, so K is split to reach the SMs;
    # never at prefill, and never with one worker (the interpreter).
    assert pick(1, 128, 1024).gate_up.split_k > 1
    assert pick(8192, 128, 1024).gate_up.split_k == pick(8192, 128, 1024).down.split_k == 1
    assert pick(1, 128, 1024, sms=1).gate_up.split_k == 1
    # Outside the table (or fp32) the heuristic gives valid tiles for any size.
    small, big = pick(1, 3, 24, dtype=torch.float32), pick(5000, 8, 1408, use_table=False)
    for cfg in (small, big):
        for g in (cfg.gate_up, cfg.down):
            assert g.block_n >= 16 and g.block_k >= 16 and g.block_n & (g.block_n - 1) == 0
    assert small.gate_up.split_k > 1 and big.gate_up.split_k == big.down.split_k == 1


# -- bad input -------------------------------------------------------------------------------

def test_rejects_bad_input():
    x, w13, w2, weights, ids = make_inputs(4, 3, 40, 24, 1, torch.float32, "cpu")
    cases = [
        ((x, w13, w2, weights, torch.zeros(4, 4, dtype=torch.int32)), {}, ValueError),  # top_k > E
        ((x, w13, w2, weights[:, :0], ids[:, :0]), {}, ValueError),  # top_k = 0: nothing would write out
        ((x, w13, w2, weights, ids + 3), {}, ValueError),  # ids out of range (checked on CPU)
        ((x, w13.half(), w2, weights, ids), {}, TypeError),  # weights/activations dtypes differ
        ((x.half(), w13.half(), w2.half(), weights, ids.float()), {}, TypeError),  # float ids
        ((x, w13[:, :-1], w2, weights, ids), {}, ValueError),  # H mismatch
        ((x, w13, w2[:, :-1], weights, ids), {}, ValueError),  # I mismatch
        ((x, w13, w2, weights[:3], ids[:3]), {}, ValueError),  # T mismatch
        ((x, w13, w2, weights, ids), dict(out=torch.empty(4, 41)), ValueError),
        ((x, w13, w2, weights, ids), dict(out=torch.empty(4, 40, dtype=torch.float16)), TypeError),
        ((x, w13, w2, weights, ids), dict(out=torch.empty(4, 40, device="meta")), ValueError),
        ((x, w13, w2, weights, ids), dict(out=x.numpy()), TypeError),
        ((x, w13, w2, weights, ids), dict(out=torch.empty(64).as_strided((4, 40), (1, 1))), ValueError),  # overlap
    ]
    for args, kwargs, exc in cases:
        with pytest.raises(exc):
            fused_moe(*args, **kwargs)


# -- GPU: bf16 at the real shapes, CUDA-graph capture ------------------------------------------

def _fp32_reference(x, w13, w2, weights, ids):
    """torch_ref.fused_moe in fp32 for top-1 routing, one expert upcast at a time (Maverick's
    bf16 experts are 32 GB; an fp32 copy of all of them would not fit)."""
    from llama4_fast.backends import torch_ref
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        rows = ids[:, 0] == e
        out[rows] = torch_ref.fused_moe(x[rows].float(), w13[e:e + 1].float(), w2[e:e + 1].float(),
                                        weights[rows], torch.zeros_like(ids[rows]))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("E,I", [(16, 8192), (128, 8192), (16, 1024), (128, 1024)])
def test_bf16_real_shapes_gpu(E, I):
    from llama4_fast.kernels import route
    H = 5120
    w13 = torch.randn(E, H, 2 * I, device="cuda", dtype=torch.bfloat16).mul_(0.02)  # in place:
    w2 = torch.randn(E, I, H, device="cuda", dtype=torch.bfloat16).mul_(0.02)  # Maverick is 32 GB
    for T in (1, 8, 256):
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        weights, ids = route(torch.randn(T, E, device="cuda", dtype=torch.bfloat16), 1)
        out = poisoned((T, H), torch.bfloat16, "cuda")
        fused_moe(x, w13, w2, weights, ids, out=out)
        err = rel_err(out, _fp32_reference(x, w13, w2, weights, ids))
        assert err < TOL[torch.bfloat16], f"T={T}: relative error {err:.3g}"
    del w13, w2
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("T,top_k", [(1, 1), (8, 1), (64, 2)])
def test_decode_step_captures_in_cuda_graph(T, top_k):
    """route + fused_moe launch without host synchronisation, so a CUDA graph can hold them."""
    from llama4_fast.kernels import route
    E, H, I = 16, 512, 1024
    x, w13, w2, _, _ = make_inputs(T, E, H, I, top_k, torch.bfloat16, "cuda")
    logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)

    def step():
        weights, ids = route(logits, top_k)
        fused_moe(x, w13, w2, weights, ids, out=out)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    eager = out.clone()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    logits.copy_(torch.randn_like(logits))  # new routing, same graph
    graph.replay()
    weights, ids = route(logits, top_k)
    assert_close(out, ref_moe(x, w13, w2, weights, ids))


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,I,top_k", [(1, 128, 1024, 1), (4, 16, 8192, 2), (4096, 16, 8192, 1)])
def test_hopper_options_on_gpu(T, E, I, top_k):
    """MoeConfig's Hopper options (TMA, epilogue pieces, programmatic dependent launch) at the
    real shapes on the GPU (TP8 decode with split K, direct top-2, sorted prefill): the default
    config's answer within bf16 rounding, eagerly and replayed from a CUDA graph (PDL edges
    captured) with new routing after capture. All three at once: the GPU suite's time limit;
    tune_moe.py --hopper runs each alone."""
    from llama4_fast.kernels import route
    H = 5120
    x, w13, w2, _, _ = make_inputs(T, E, H, I, top_k, torch.bfloat16, "cuda")
    logits = torch.randn(T, E, device="cuda", dtype=torch.bfloat16)
    base = moe.launch_config(x, w13, w2, top_k)
    out = torch.empty_like(x)
    cfg = replace(base, tma=True, epilogue_block_n=64, pdl=True)

    def step():
        weights, ids = route(logits, top_k)
        fused_moe(x, w13, w2, weights, ids, out=out, config=cfg)

    step()
    weights, ids = route(logits, top_k)
    assert_close(out, fused_moe(x, w13, w2, weights, ids, config=base))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    logits.copy_(torch.randn_like(logits))
    out.fill_(float("nan"))
    graph.replay()
    weights, ids = route(logits, top_k)
    assert_close(out, fused_moe(x, w13, w2, weights, ids, config=base))


@pytest.mark.gpu
def test_out_of_range_ids_skipped_on_gpu():
    x, w13, w2, weights, ids = make_inputs(32, 8, 256, 128, 2, torch.bfloat16, "cuda")
    ids[0, 1], ids[3, 0] = -1, 8
    out = poisoned(x.shape, x.dtype, "cuda")
    fused_moe(x, w13, w2, weights, ids, out=out)
    assert_close(out, ref_moe(x, w13, w2, weights, ids))


# -- transformers' other experts: biases, activations, interleaved gate/up, gpt-oss's gate -------

VARIANTS = {
    "gelu": dict(activation="gelu"),
    "gelu_tanh": dict(activation="gelu_tanh"),
    "interleaved": dict(gate_up_interleaved=True),
    "biases": dict(biases=True),
    "gpt_oss": dict(gate_up_interleaved=True, clamped_swiglu=(0.7, 1.702), biases=True),
}


def variant_kwargs(variant: str, E, H, I, dtype, device) -> dict:
    """fused_moe's keyword options for VARIANTS[variant]; biases at about the GEMMs' scale."""
    kw = dict(VARIANTS[variant])
    if kw.pop("biases", False):
        kw.update(gate_up_bias=(torch.randn(E, 2 * I, device=device) * 0.5).to(dtype),
                  down_bias=(torch.randn(E, H, device=device) * 0.5).to(dtype))
    return kw


def reference_kwargs(kw: dict, on_input: bool) -> dict:
    """experts64's arguments for fused_moe's options."""
    return dict(on_input=on_input, gate_up_bias=kw.get("gate_up_bias"), down_bias=kw.get("down_bias"),
                activation=kw.get("activation", "silu"), interleaved=kw.get("gate_up_interleaved", False),
                clamped_swiglu=kw.get("clamped_swiglu"))


def linear_style(w13, w2):
    """The same weights as transformers' nn.Linear-style experts hold them ([E, 2I, H] / [E, H, I]),
    seen as [E, H, 2I] / [E, I, H] views."""
    return w13.transpose(1, 2).contiguous().transpose(1, 2), w2.transpose(1, 2).contiguous().transpose(1, 2)


# Direct (decode) and sorted paths, fp32 and fp16, the router weight on either side (biases only
# on the output, as transformers has them), and split K on both GEMMs: a bias is added once.
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("T,E,top_k,dtype,on_input,splits", [
    (5, 4, 2, torch.float32, False, None),
    (40, 4, 2, torch.float16, True, None),
    (40, 8, 1, torch.float32, False, (3, 2)),
])
def test_expert_variants_match_float64(device, variant, T, E, top_k, dtype, on_input, splits):
    H, I = 40, 24
    x, w13, w2, weights, ids = make_inputs(T, E, H, I, top_k, dtype, device)
    kw = variant_kwargs(variant, E, H, I, dtype, device)
    if "down_bias" in kw and on_input:
        on_input = False
    if splits is not None:
        w13, w2 = linear_style(w13, w2)
        kw["config"] = _cfg(16, *splits)
    out = poisoned(x.shape, dtype, device)
    fused_moe(x, w13, w2, weights, ids, apply_router_weight_on_input=on_input, out=out, **kw)
    kw.pop("config", None)
    assert_close(out, experts64(x, w13, w2, weights, ids, **reference_kwargs(kw, on_input)))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("T,top_k,split,layout", [(3, 2, 2, "stored"), (40, 2, 1, "stored"), (40, 2, 1, "linear")])
def test_expert_variants_with_tma(device, variant, T, top_k, split, layout):
    """MoeConfig.tma with transformers' other experts: interleaved gate/up columns come in one
    block twice as wide (split into gate and up in registers; for nn.Linear-style weights, a
    block of the transpose), biases and gates as without."""
    E, H, I = 4, 40, 24
    x, w13, w2, weights, ids = make_inputs(T, E, H, I, top_k, torch.float32, device)
    kw = variant_kwargs(variant, E, H, I, torch.float32, device)
    w = (w13, w2) if layout == "stored" else linear_style(w13, w2)
    desc, transposed = kernel_device.weight_descriptor(w[0], 16, 32)
    assert desc is not None and transposed == (layout == "linear")
    out = poisoned(x.shape, x.dtype, device)
    fused_moe(x, *w, weights, ids, apply_router_weight_on_input=False, out=out,
              config=replace(_cfg(16, split, 1), tma=True), **kw)
    assert_close(out, experts64(x, w13, w2, weights, ids, **reference_kwargs(kw, False)))


def test_clamped_gate_keeps_nan(device):
    """gpt-oss's clamps propagate NaN as torch.clamp does (tl.minimum would drop it)."""
    T, E, H, I = 12, 4, 40, 24
    x, w13, w2, weights, ids = make_inputs(T, E, H, I, 1, torch.float32, device)
    kw = variant_kwargs("gpt_oss", E, H, I, torch.float32, device)
    kw["gate_up_bias"][ids[0, 0], 2] = float("nan")  # a gate column (interleaved: even) of token 0's expert
    kw["gate_up_bias"][ids[1, 0], 5] = float("nan")  # an up column of token 1's expert
    out = fused_moe(x, w13, w2, weights, ids, apply_router_weight_on_input=False, **kw)
    ref = experts64(x, w13, w2, weights, ids, **reference_kwargs(kw, False))
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(ref)) and torch.isnan(out[:2]).all()
    finite = ~torch.isnan(ref).any(dim=1)
    assert_close(out[finite.to(device)], ref[finite])


@pytest.mark.parametrize("T", [6, 50])
def test_sentinel_ids_are_skipped_when_allowed(device, T):
    """Expert-parallel sentinels (ids >= E) contribute nothing, on every device, when asked;
    negative ids are still refused on CPU."""
    E = 5
    x, w13, w2, weights, ids = make_inputs(T, E, 40, 24, 2, torch.float32, device)
    ids[0, 0], ids[1, 1], ids[2] = E, E + 7, torch.tensor([E, E + 1])
    out = poisoned(x.shape, x.dtype, device)
    fused_moe(x, w13, w2, weights, ids, out=out, skip_sentinel_ids=True)
    assert_close(out, ref_moe(x, w13, w2, weights, ids))
    assert out[2].abs().max().item() == 0.0
    if device == "cpu":
        with pytest.raises(ValueError, match="topk_ids"):
            fused_moe(x, w13, w2, weights, ids)
        with pytest.raises(ValueError, match=">= 0"):
            fused_moe(x, w13, w2, weights, ids.masked_fill(ids == E, -1), skip_sentinel_ids=True)


def test_rejects_bad_variant_options():
    E, H, I = 3, 40, 24
    x, w13, w2, weights, ids = make_inputs(4, E, H, I, 1, torch.float32, "cpu")
    b13, b2 = torch.zeros(E, 2 * I), torch.zeros(E, H)
    cases = [
        (dict(gate_up_bias=b13), ValueError, "gate_up_bias"),  # the router weight on the input
        (dict(gate_up_bias=b13[:, :-1], apply_router_weight_on_input=False), ValueError, "gate_up_bias"),
        (dict(down_bias=b2.half(), apply_router_weight_on_input=False), TypeError, "down_bias"),
        (dict(activation="relu"), ValueError, "activation"),
        (dict(gate_up_interleaved=1), TypeError, "gate_up_interleaved"),
        (dict(clamped_swiglu=7.0), TypeError, "clamped_swiglu"),
        (dict(clamped_swiglu=(0.0, 1.0)), ValueError, "clamped_swiglu"),
        (dict(clamped_swiglu=(7.0, 1.7), activation="gelu"), ValueError, "clamped_swiglu"),
    ]
    for kw, exc, name in cases:
        with pytest.raises(exc, match=name):
            fused_moe(x, w13, w2, weights, ids, **kw)

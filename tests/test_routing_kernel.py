"""The Triton routing kernels: `route` (fused top-k + scoring) and `dispatch_metadata`.

References are tests/reference64.py float64 restatements; ids must match exactly.
On CPU the kernels run through the Triton interpreter (tests/conftest.py).
"""

import pytest
import torch

from llama4_fast.kernels import route
from reference64 import route64
from llama4_fast.kernels.routing import dispatch_metadata, max_row_blocks

# (T, E, top_k): every T in {0, 1, 7, 64, 300}, every E in {1, 3, 16, 128}, top_k in {1, 2, 4}.
ROUTE_CASES = [(0, 16, 1), (1, 1, 1), (1, 3, 2), (7, 3, 1), (7, 16, 4), (64, 16, 1), (64, 128, 2),
               (300, 128, 1), (300, 16, 4), (300, 128, 4)]


def ref_route(logits, top_k, scoring, renormalize):
    w, ids = route64(logits, top_k, scoring, renormalize)
    return w, ids.to(torch.int32)


def check_route(logits, top_k, scoring="sigmoid", renormalize=False):
    w, ids = route(logits, top_k, scoring, renormalize)
    T = logits.shape[0]
    assert w.shape == (T, top_k) and w.dtype == torch.float32 and w.is_contiguous()
    assert ids.shape == (T, top_k) and ids.dtype == torch.int32 and ids.is_contiguous()
    ref_w, ref_ids = ref_route(logits, top_k, scoring, renormalize)
    assert torch.equal(ids.cpu(), ref_ids)
    if T:
        assert torch.isfinite(w).all()
        err = ((w.cpu().double() - ref_w).abs() / ref_w.abs().clamp_min(1e-30)).max().item()
        assert err < 1e-5, f"max relative weight error {err:.3g}"


@pytest.mark.parametrize("T,E,top_k", ROUTE_CASES)
@pytest.mark.parametrize("scoring,renormalize", [("sigmoid", False), ("softmax", False), ("softmax", True)])
def test_route_matches_float64(device, T, E, top_k, scoring, renormalize):
    dtype = torch.float16 if (T + E) % 2 else torch.float32  # both dtypes across the grid
    logits = torch.randn(T, E, device=device).to(dtype) * 3
    check_route(logits, top_k, scoring, renormalize)


def test_route_ties_infinities_and_strides(device):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0],  # three-way tie: 1, 2, 4 in that order
                           [float("-inf")] * 5,  # all -inf: indices 0, 1, 2
                           [0.0, float("-inf"), 2.0, float("inf"), -1.0]], device=device)
    w, ids = route(logits, 3)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2], [3, 2, 0]]
    assert w[2, 0].item() == 1.0 and w[1].tolist() == [0.0, 0.0, 0.0]
    # A transposed (non-contiguous) view is read through its strides.
    base = torch.randn(16, 40, device=device)
    check_route(base.t(), 2, "softmax", True)


def test_torch_backend_breaks_ties_like_the_kernel(device):
    """Logits from a handful of values tie often (as bf16 router logits do): the torch
    reference must pick the same experts, the lower index first."""
    from llama4_fast.backends import torch_ref
    logits = torch.randint(0, 4, (256, 16), device=device).float()
    for top_k, scoring, renormalize in ((1, "sigmoid", False), (4, "softmax", True)):
        w, ids = route(logits, top_k, scoring, renormalize)
        ref_w, ref_ids = torch_ref.route(logits, top_k, scoring, renormalize)
        assert torch.equal(ids, ref_ids) and torch.allclose(w, ref_w)


def nonfinite_logits(dtype, device):
    """[T, 6] logits where NaN and +-inf decide the order: NaN after a +inf (NaN must still rank
    first), several NaNs, +inf ties, all-NaN / all-inf / all -inf rows, one finite value among
    -inf, and random rows with a third of their entries replaced by NaN, +inf or -inf."""
    nan, inf = float("nan"), float("inf")
    rows = torch.tensor([
        [0.5, inf, nan, 2.0, -inf, 1.0],
        [nan, 3.0, inf, nan, 0.0, -1.0],
        [inf, -1.0, inf, 2.0, nan, inf],
        [-inf, -inf, 1.0, -inf, -inf, -inf],
        [nan] * 6, [inf] * 6, [-inf] * 6,
        [-2.0, -inf, 5.0, 5.0, -inf, 0.0],
    ])
    noisy = torch.randn(24, 6) * 3
    pick = torch.rand(24, 6)
    noisy[pick < 0.1] = nan
    noisy[(pick >= 0.1) & (pick < 0.2)] = inf
    noisy[(pick >= 0.2) & (pick < 0.3)] = -inf
    return torch.cat([rows, noisy]).to(dtype).to(device)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy on inf - inf
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("scoring,renormalize", [("sigmoid", False), ("softmax", False), ("softmax", True)])
def test_route_nan_and_infinite_logits(device, dtype, scoring, renormalize):
    """Kernel = float64 reference = torch backend: NaN ranks above +inf (torch.topk's order),
    ties go to the lower index, and the weights are the float math's (sigmoid(NaN) = NaN,
    sigmoid(-inf) = 0; a softmax row holding a NaN or a +inf is NaN)."""
    from llama4_fast.backends import torch_ref
    logits = nonfinite_logits(dtype, device)
    for top_k in range(1, 5):
        ref_w, ref_ids = ref_route(logits, top_k, scoring, renormalize)
        for backend in (route, torch_ref.route):
            w, ids = backend(logits, top_k, scoring, renormalize)
            assert torch.equal(ids.cpu(), ref_ids), f"top_k={top_k}"
            torch.testing.assert_close(w.cpu().double(), ref_w, rtol=1e-6, atol=1e-12, equal_nan=True)


def test_route_softmax_of_large_logits(device):
    """Logits around 100 overflow exp() in fp32 (e^88.7): softmax must subtract the row max."""
    logits = torch.randn(37, 16, device=device) * 3 + 100
    check_route(logits, 2, "softmax", False)
    check_route(logits, 2, "softmax", True)


@pytest.mark.gpu
@pytest.mark.parametrize("E", [16, 128])
def test_route_bf16_gpu(E):
    logits = (torch.randn(256, E, device="cuda") * 3).to(torch.bfloat16)
    check_route(logits, 1)
    check_route(logits, 4, "softmax", True)


@pytest.mark.parametrize("bad,exc", [
    (dict(top_k=5), ValueError),  # top_k > E
    (dict(top_k=0), ValueError),
    (dict(top_k=2.0), TypeError),
    (dict(scoring="relu"), ValueError),
    (dict(renormalize=True), ValueError),  # only defined for softmax
    (dict(logits=torch.randn(8)), ValueError),  # not 2-D
    (dict(logits=torch.ones(3, 4, dtype=torch.int32)), TypeError),
])
def test_route_rejects_bad_input(bad, exc):
    args = dict(logits=torch.randn(3, 4), top_k=1, scoring="sigmoid", renormalize=False) | bad
    with pytest.raises(exc):
        route(args["logits"], args["top_k"], args["scoring"], args["renormalize"])


# ----------------------------------------------------------------------------------------------
# dispatch metadata
# ----------------------------------------------------------------------------------------------

def check_metadata(ids, E, block_m):
    meta = dispatch_metadata(ids, E, block_m)
    flat = ids.reshape(-1).long().cpu()
    P = flat.numel()
    bucket = torch.where((flat >= 0) & (flat < E), flat, torch.full_like(flat, E))
    counts = torch.bincount(bucket, minlength=E + 1)
    assert meta.sorted_pairs.shape == (P,) and meta.sorted_pairs.dtype == torch.int32
    assert meta.expert_offsets.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    blocks = (counts + block_m - 1) // block_m
    assert meta.block_offsets.tolist() == [0] + torch.cumsum(blocks, 0).tolist()
    assert meta.block_m == block_m
    assert meta.block_offsets[-1].item() <= meta.max_blocks == max_row_blocks(P, E + 1, block_m)
    # Each bucket's segment holds exactly its pairs, in ascending (token) order; so every
    # pair appears exactly once.
    sorted_pairs = meta.sorted_pairs.long().cpu()
    offsets = meta.expert_offsets.tolist()
    for b in range(E + 1):
        seg = sorted_pairs[offsets[b]:offsets[b + 1]]
        assert torch.equal(seg, torch.nonzero(bucket == b).flatten()), f"bucket {b}"
    return meta


@pytest.mark.parametrize("T,E,top_k,block_m", [
    (1, 1, 1, 16), (7, 3, 2, 16), (64, 16, 1, 16), (64, 128, 2, 32),  # one launch
    (300, 16, 1, 64), (300, 128, 4, 16), (300, 3, 1, 128),  # three launches (T*k > 256)
    (2100, 128, 2, 16),  # more chunks than the scan kernel's tile: the carry between tiles
])
def test_metadata_groups_every_pair_once(device, T, E, top_k, block_m):
    logits = torch.randn(T, E, device=device)
    _, ids = route(logits, top_k)
    check_metadata(ids, E, block_m)


@pytest.mark.parametrize("T", [40, 700])
def test_metadata_skewed_empty_and_out_of_range(device, T):
    E = 16
    ids = torch.full((T, 2), 5, dtype=torch.int64, device=device)  # every token on expert 5 ...
    ids[::3, 1] = 11  # ... or 11; every other expert gets nothing
    ids[1, 0], ids[2, 1], ids[-1, 0] = -1, E, E + 7  # out of range -> bucket E
    meta = check_metadata(ids, E, 16)
    assert (meta.expert_offsets[1:E + 1] - meta.expert_offsets[:E]).nonzero().flatten().tolist() == [5, 11]


def test_metadata_rejects_bad_input():
    ids = torch.zeros(4, 1, dtype=torch.int32)
    with pytest.raises(TypeError):
        dispatch_metadata(ids.float(), 4, 16)
    with pytest.raises(ValueError):
        dispatch_metadata(ids.view(-1), 4, 16)
    with pytest.raises(ValueError):
        dispatch_metadata(ids, 0, 16)
    with pytest.raises(ValueError):
        dispatch_metadata(ids, 4, 0)

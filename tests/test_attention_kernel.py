"""Triton chunked flash attention (kernels/attention.py) against a float64 reference.

On CPU the kernel runs under the Triton interpreter (fp16/fp32, small shapes); the bf16 cases at
Llama 4 shapes are GPU-marked. The reference builds its own boolean visibility mask from the
position rules of DESIGN.md, independently of the code under test.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import TOL, assert_close, poisoned, rel_err
from llama4_fast.kernels import attention as attn
from llama4_fast.kernels.attention import chunked_attention, supports_head_dim

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float16, torch.float32]


def visible_mask(B, Sq, Skv, chunk_size=None, kv_start=0):
    """bool [B, Sq, Skv]: key j of sequence b sits at position start_b + j, query i at
    start_b + Skv - Sq + i; visible iff 0 <= key pos <= query pos (and same chunk)."""
    starts = kv_start.cpu().long() if isinstance(kv_start, torch.Tensor) else torch.full((B,), kv_start)
    key_pos = starts[:, None] + torch.arange(Skv)[None, :]  # [B, Skv]
    query_pos = key_pos[:, Skv - Sq:]  # [B, Sq]
    kp, qp = key_pos[:, None, :], query_pos[:, :, None]
    mask = (kp >= 0) & (kp <= qp)
    if chunk_size is not None:
        mask &= torch.div(kp, chunk_size, rounding_mode="floor") == torch.div(qp, chunk_size, rounding_mode="floor")
    return mask


def reference(q, k, v, *, chunk_size=None, kv_start=0, scale=None):
    """Dense float64 attention with K/V repeated per query head; rows with no visible key are 0.
    Returns (out [B, Hq, Sq, D] float64, mask [B, Sq, Skv])."""
    B, Hq, Sq, D = q.shape
    Skv = k.shape[2]
    group = Hq // k.shape[1]
    mask = visible_mask(B, Sq, Skv, chunk_size, kv_start).to(q.device)
    kx = k.double().repeat_interleave(group, dim=1)
    vx = v.double().repeat_interleave(group, dim=1)
    scores = q.double() @ kx.transpose(-1, -2) * (D ** -0.5 if scale is None else scale)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(mask[:, None].any(-1, keepdim=True), probs, 0.0)
    return probs @ vx, mask


def make_qkv(B, Hq, Hkv, Sq, Skv, D, dtype, device):
    q = torch.randn(B, Hq, Sq, D, dtype=dtype, device=device)
    k = torch.randn(B, Hkv, Skv, D, dtype=dtype, device=device)
    v = torch.randn(B, Hkv, Skv, D, dtype=dtype, device=device)
    return q, k, v


def check(q, k, v, *, chunk_size=None, kv_start=0, scale=None, tol=None):
    """Run into a NaN-poisoned `out`, compare with the reference, and require exact zeros on
    rows that see no key."""
    out = poisoned(q.shape, q.dtype, q.device)
    got = chunked_attention(q, k, v, chunk_size=chunk_size, kv_start=kv_start, scale=scale, out=out)
    assert got is out
    ref, mask = reference(q, k, v, chunk_size=chunk_size, kv_start=kv_start, scale=scale)
    assert_close(got, ref, dtype=q.dtype, tol=tol)
    blind = ~mask.any(-1)  # [B, Sq] queries that see nothing (negative positions)
    if blind.any():
        assert (got.permute(0, 2, 1, 3)[blind] == 0).all(), "rows that see no key must be zeros"
    return got


@pytest.fixture
def small_tiles(monkeypatch):
    """16 x 16 tiles: many tiles, phase boundaries and straddles even at tiny lengths."""
    monkeypatch.setattr(attn, "_launch_config", lambda *a: attn.LaunchConfig(16, 16, 4, 2))


def force_splits(monkeypatch, n):
    monkeypatch.setattr(attn, "_num_splits", lambda *a: n)


# (B, Hq, Hkv, Sq, Skv, D, chunk_size, kv_start) for the default (H100) tile table:
# 128 x 64 tiles for 16-bit prefill, 16 x 16 for fp32.
PREFILL = [
    pytest.param(1, 2, 2, 200, 200, 16, None, 0, id="causal-tail-g1"),
    pytest.param(1, 4, 2, 150, 150, 64, 48, 0, id="chunk48-not-dividing-g2"),
    pytest.param(2, 5, 1, 130, 130, 16, 32, 0, id="chunk32-dividing-g5"),
    pytest.param(1, 2, 1, 70, 190, 16, 64, 0, id="continued-prefill"),
    pytest.param(1, 2, 1, 90, 120, 16, 50, 37, id="kv-start-across-chunk"),
    pytest.param(1, 2, 2, 33, 33, 16, 7, 5, id="tiny-chunks"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,Sq,Skv,D,chunk,start", PREFILL)
def test_prefill(device, dtype, B, Hq, Hkv, Sq, Skv, D, chunk, start):
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Skv, D, dtype, device)
    check(q, k, v, chunk_size=chunk, kv_start=start)


@pytest.mark.parametrize("chunk", [None, 16, 24, 40])
def test_small_tiles_chunk_and_padding(device, small_tiles, chunk):
    """Chunks that do (16) and do not (24, 40) divide the tile, left padding per sequence,
    continued prefill: exercises the masked head / unmasked bulk / masked diagonal phases."""
    q, k, v = make_qkv(3, 4, 2, 61, 77, 16, torch.float16, device)
    starts = torch.tensor([-19, 0, 45], device=device)
    check(q, k, v, chunk_size=chunk, kv_start=starts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_left_padding_tensor_start(device, dtype, index_dtype):
    """kv_start as a [B] tensor: padding keys are skipped and padding query rows are zeros."""
    q, k, v = make_qkv(4, 4, 2, 100, 100, 16, dtype, device)
    starts = torch.tensor([0, -30, -99, 12], dtype=index_dtype, device=device)
    check(q, k, v, chunk_size=32, kv_start=starts)


@pytest.mark.parametrize("Sq", [1, 3, 16])
@pytest.mark.parametrize("chunk", [None, 64])
@pytest.mark.parametrize("splits", [1, 3, 13])
def test_decode_split_kv(device, monkeypatch, Sq, chunk, splits):
    """Decode layout (GQA group of 5 packed into the rows) over a batch with different starts;
    13 splits leave some splits without tiles (they must weigh nothing in the merge)."""
    force_splits(monkeypatch, splits)
    q, k, v = make_qkv(3, 10, 2, Sq, 300, 16, torch.float16, device)
    starts = torch.tensor([0, -250, 1000], device=device)
    check(q, k, v, chunk_size=chunk, kv_start=starts)


def check_kv_len(attend, q, k, v, kv_len, *, chunk_size=None, kv_start=0):
    """kv_len: sequence b owns keys [0, kv_len[b]); the cache tail past it is NaN, so any read
    of a key that does not exist poisons the output. Reference: each sequence on its own."""
    Sq = q.shape[2]
    k, v = k.clone(), v.clone()
    for b, n in enumerate(kv_len.tolist()):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    got = attend(q, k, v, chunk_size=chunk_size, kv_start=kv_start, kv_len=kv_len)
    starts = kv_start.tolist() if isinstance(kv_start, torch.Tensor) else [kv_start] * q.shape[0]
    for b, n in enumerate(kv_len.tolist()):
        ref, _ = reference(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], chunk_size=chunk_size, kv_start=starts[b])
        assert_close(got[b:b + 1], ref, dtype=q.dtype)
    assert got.shape[2] == Sq


@pytest.mark.parametrize("Sq", [1, 4, 40])
@pytest.mark.parametrize("chunk", [None, 24])
@pytest.mark.parametrize("splits", [1, 5])
def test_kv_len_static_cache(device, monkeypatch, Sq, chunk, splits):
    """A static cache buffer of 160 slots filled to a different level per sequence (decode and
    prefill layouts, with and without splits, one sequence filled exactly to Sq)."""
    force_splits(monkeypatch, splits)
    q, k, v = make_qkv(3, 10, 2, Sq, 160, 16, torch.float16, device)
    kv_len = torch.tensor([Sq, 97, 160], dtype=torch.int32, device=device)
    starts = torch.tensor([0, -20, 30], device=device)
    check_kv_len(chunked_attention, q, k, v, kv_len, chunk_size=chunk, kv_start=starts)


def test_kv_len_torch_backend(device):
    from llama4_fast.backends import torch_ref

    q, k, v = make_qkv(2, 4, 2, 3, 50, 16, torch.float32, device)
    check_kv_len(torch_ref.attention, q, k, v, torch.tensor([3, 41], device=device), chunk_size=16, kv_start=7)


def test_kv_len_bad_inputs(device):
    q, k, v = make_qkv(2, 4, 2, 4, 8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="kv_len must lie in"):
        chunked_attention(q, k, v, kv_len=torch.tensor([3, 8]))
    with pytest.raises(ValueError, match="kv_len must lie in"):
        chunked_attention(q, k, v, kv_len=torch.tensor([4, 9]))
    with pytest.raises(ValueError, match="kv_len must be a \\[B=2\\]"):
        chunked_attention(q, k, v, kv_len=torch.tensor([4]))
    with pytest.raises(TypeError, match="kv_len"):
        chunked_attention(q, k, v, kv_len=5)
    with pytest.raises(TypeError, match="kv_len"):
        chunked_attention(q, k, v, kv_len=torch.tensor([4.0, 5.0]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_default_plan_splits(device, dtype):
    """Without forcing, one sequence over a long cache is split (flash-decoding) and merged."""
    B, Hkv, Skv = 1, 1, 1100
    q, k, v = make_qkv(B, 5, Hkv, 1, Skv, 32, dtype, device)
    cfg = attn._launch_config(32, dtype, True, 5)
    assert attn._num_splits(B * Hkv, Skv, cfg.block_n, q.device) > 1
    check(q, k, v, kv_start=7)
    check(q, k, v, chunk_size=512, kv_start=7)


def test_prefill_split_kv(device, monkeypatch):
    """Split-KV also serves prefill blocks (few long query blocks); rows of different lengths."""
    force_splits(monkeypatch, 4)
    q, k, v = make_qkv(1, 2, 1, 40, 260, 16, torch.float32, device)
    check(q, k, v, chunk_size=100, kv_start=torch.tensor([-3], device=device))


@pytest.mark.parametrize("D", [8, 24, 80])
def test_padded_head_dims(device, D):
    q, k, v = make_qkv(1, 2, 1, 40, 40, D, torch.float32, device)
    check(q, k, v, chunk_size=16)
    check(q[:, :, -2:], k, v)  # decode layout


def test_supports_head_dim():
    assert all(supports_head_dim(d) for d in (1, 16, 64, 96, 128, 256))
    assert not any(supports_head_dim(d) for d in (0, -1, 257, 512, True, 64.0))


def test_strided_inputs_and_out(device):
    """[B, S, H, D] storage viewed as [B, H, S, D] (what transformers passes), and a strided out."""
    B, Hq, Hkv, S, D = 2, 10, 2, 50, 16
    q = torch.randn(B, S, Hq, D, dtype=torch.float16, device=device).transpose(1, 2)
    k = torch.randn(B, S, Hkv, D, dtype=torch.float16, device=device).transpose(1, 2)
    v = torch.randn(B, S, Hkv, D, dtype=torch.float16, device=device).transpose(1, 2)
    assert not q.is_contiguous()
    out = poisoned((B, S, Hq, D), torch.float16, device).transpose(1, 2)
    got = chunked_attention(q, k, v, chunk_size=20, kv_start=3, out=out)
    assert got is out
    assert_close(got, reference(q, k, v, chunk_size=20, kv_start=3)[0], dtype=torch.float16)
    # a new output takes q's [B, S, H, D] layout, so transformers' transpose back is free
    got = chunked_attention(q, k, v, chunk_size=20, kv_start=3)
    assert got.stride() == q.stride()
    assert_close(got, reference(q, k, v, chunk_size=20, kv_start=3)[0], dtype=torch.float16)
    # decode layout on strided views
    got = chunked_attention(q[:, :, -4:], k, v, kv_start=3)
    assert_close(got, reference(q[:, :, -4:], k, v, kv_start=3)[0], dtype=torch.float16)


def test_scale_and_returns_new_tensor(device):
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, torch.float32, device)
    out = chunked_attention(q, k, v, scale=0.3)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert_close(out, reference(q, k, v, scale=0.3)[0])


def test_agrees_with_torch_backend(device):
    from llama4_fast.backends import torch_ref

    q, k, v = make_qkv(2, 10, 2, 70, 90, 16, torch.float32, device)
    starts = torch.tensor([-10, 8200], device=device)
    for chunk in (None, 32):
        ref = torch_ref.attention(q, k, v, chunk_size=chunk, kv_start=starts)
        got = chunked_attention(q, k, v, chunk_size=chunk, kv_start=starts)
        assert rel_err(got, ref) < TOL[torch.float32]
    got = chunked_attention(q[:, :, -1:], k, v, chunk_size=64, kv_start=5)
    assert rel_err(got, torch_ref.attention(q[:, :, -1:], k, v, chunk_size=64, kv_start=5)) < TOL[torch.float32]


def test_registry_triton_backend(device):
    """ops.attention reaches this kernel through the triton backend's custom op."""
    from llama4_fast import ops, registry
    import llama4_fast.backends.triton_ops  # noqa: F401  (registers the backend)

    q, k, v = make_qkv(1, 4, 2, 30, 30, 16, torch.float32, device)
    with registry.use(attention="triton"):
        got = ops.attention(q, k, v, chunk_size=8, kv_start=torch.tensor([2], device=device))
    assert_close(got, reference(q, k, v, chunk_size=8, kv_start=torch.tensor([2]))[0])


def test_empty_inputs(device):
    q, k, v = make_qkv(1, 2, 1, 0, 5, 16, torch.float32, device)
    assert chunked_attention(q, k, v).shape == (1, 2, 0, 16)
    q, k, v = make_qkv(0, 2, 1, 3, 5, 16, torch.float32, device)
    assert chunked_attention(q, k, v).shape == (0, 2, 3, 16)


def test_bad_inputs_raise(device):
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        chunked_attention(q[0], k, v)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        chunked_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="last Sq"):
        chunked_attention(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(TypeError, match="share a dtype"):
        chunked_attention(q, k.half(), v)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="kv_start"):
        chunked_attention(q, k, v, kv_start=torch.zeros(3, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="kv_start"):
        chunked_attention(q, k, v, kv_start=1.5)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        chunked_attention(q, k, v, kv_start=2**31 - 4)
    with pytest.raises(ValueError, match="head dim"):
        chunked_attention(*make_qkv(1, 1, 1, 2, 2, 320, torch.float32, device))
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        chunked_attention(q, k, v, out=[0])
    with pytest.raises(ValueError, match="out must have q's shape"):
        chunked_attention(q, k, v, out=torch.empty(1, 4, 8, 8, device=device))
    with pytest.raises(TypeError, match="out must have q's dtype"):
        chunked_attention(q, k, v, out=torch.empty_like(q, dtype=torch.float16))
    with pytest.raises(ValueError, match="broadcast"):
        chunked_attention(q, k, v, out=torch.empty(1, 4, 8, 1, device=device).expand(1, 4, 8, 16))


@pytest.mark.skipif(HAS_CUDA, reason="interpreter-only restriction")
def test_bf16_rejected_under_interpreter():
    q, k, v = make_qkv(1, 1, 1, 4, 4, 16, torch.bfloat16, "cpu")
    with pytest.raises(TypeError, match="bfloat16"):
        chunked_attention(q, k, v)


_COMPILE_SCRIPT = textwrap.dedent("""
    import os, re, subprocess, tempfile, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from llama4_fast.kernels import attention as A

    def compile_fwd(dtype, decode, rows, split):
        cfg = A._launch_config(128, torch.bfloat16, decode, rows)
        sig = {n: "i32" for n in A._attn_fwd.arg_names}
        for n in ("Q", "K", "V", "Out"):
            sig[n] = "*" + dtype
        sig.update(PartialO="*fp32", PartialLSE="*fp32", KVStart="*i64", KVLen="*i32", qk_scale="fp32")
        const = dict(GROUP=5, PACK=5 if decode else 1, HEAD_DIM=128, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                     BLOCK_D=128, CHUNKED=True, KV_START_TENSOR=decode, KV_LEN_TENSOR=decode, SPLIT=split,
                     STORE_LSE=False, KV_TMA=False, INPUT_PRECISION="tf32",
                     stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1)
        sig.update({n: "constexpr" for n in const})
        # what a launch specialises: 16-byte aligned pointers, strides/chunk divisible by 16
        div = [n for n, t in sig.items() if t.startswith("*") or (n.startswith("stride_") and t == "i32")]
        attrs = {(A._attn_fwd.arg_names.index(n),): [["tt.divisibility", 16]] for n in div + ["chunk_size"]}
        return triton.compile(ASTSource(A._attn_fwd, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))

    def compile_merge(splits, block_d):
        sig = {n: "i32" for n in A._merge_splits.arg_names}
        sig.update(PartialO="*fp32", PartialLSE="*fp32", Out="*bf16")
        const = dict(PACK=5, HEAD_DIM=block_d, SPLITS=splits, BLOCK_D=block_d, stride_od=1)
        sig.update({n: "constexpr" for n in const})
        return triton.compile(ASTSource(A._merge_splits, sig, const), target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=8 if splits * block_d > 4096 else 4))

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    variants = [(compile_fwd, ("bf16", False, 8192, False)), (compile_fwd, ("bf16", True, 5, True)),
                (compile_merge, (64, 128)), (compile_merge, (64, 256))]
    for compile_fn, args in variants:
        kernel = compile_fn(*args)
        assert "wgmma" in kernel.asm["ptx"] or compile_fn is compile_merge or args[1], "prefill should use wgmma"
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"]); f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        stack = int(re.search(r"STACK:(\\d+)", usage).group(1))
        print(args, usage.strip().splitlines()[-1].strip())
        assert stack == 0, f"register spills for {args}: {usage}"
""")


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tests run the real kernels")
def test_compiles_for_h100_without_spills():
    """Compile the two Llama 4 variants (prefill and split decode, bf16, D=128) and the split
    merge (64 splits, D=128 and 256) for sm_90
    ahead of time, without a GPU, and require no register spills (ptxas via cuobjdump)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton has no ahead-of-time compile API here: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    if proc.returncode and ("cuobjdump" in proc.stderr and "No such file" in proc.stderr):
        pytest.skip("triton wheel without the CUDA tools")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# GPU: bf16 at Llama 4 shapes (40 query heads, 8 KV heads, head dim 128)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [1024, None])
def test_gpu_llama4_prefill_bf16(chunk):
    q, k, v = make_qkv(1, 40, 8, 2048, 2048, 128, torch.bfloat16, "cuda")
    check(q, k, v, chunk_size=chunk)


@pytest.mark.gpu
@pytest.mark.parametrize("Sq", [1, 4])
def test_gpu_llama4_decode_bf16(Sq):
    """8k cache, a batch whose sequences start at different places (one left-padded, one
    continuing past a chunk boundary); chunked (C=8192) and global layers."""
    q, k, v = make_qkv(4, 40, 8, Sq, 8192, 128, torch.bfloat16, "cuda")
    starts = torch.tensor([0, -3000, 5000, 16384], device="cuda")
    for chunk in (8192, None):
        check(q, k, v, chunk_size=chunk, kv_start=starts)


@pytest.mark.gpu
def test_gpu_fp32_is_exact():
    """float32 uses the ieee dot (no tf32), so it meets the fp32 tolerance on the GPU too."""
    q, k, v = make_qkv(2, 10, 2, 300, 300, 128, torch.float32, "cuda")
    check(q, k, v, chunk_size=128, kv_start=torch.tensor([-20, 100], device="cuda"))
    check(q[:, :, -2:], k, v, chunk_size=128, kv_start=torch.tensor([-20, 100], device="cuda"))


def _needs_free_gib(gib):
    free = torch.cuda.mem_get_info()[0] if HAS_CUDA else 0
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory")


@pytest.mark.gpu
def test_gpu_int64_offsets_long_prefill():
    """q/out in [B, S, H, D] storage with S * Hq * D > 2**31 elements: the query/output row
    offsets overflow int32. Checks the last chunk's last rows of the first and last head."""
    _needs_free_gib(14)
    S, C, Hq, Hkv, D = 420_000, 8192, 40, 8, 128
    assert S * Hq * D > 2**31
    q = torch.randn(1, S, Hq, D, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    k = torch.randn(1, S, Hkv, D, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    v = torch.randn(1, S, Hkv, D, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    out = chunked_attention(q, k, v, chunk_size=C)
    cs = (S - 1) // C * C  # the last chunk's first position
    rows = slice(S - 64, S)
    for h in (0, Hq - 1):
        ref, _ = reference(q[:, h:h + 1, rows], k[:, h // 5:h // 5 + 1, cs:], v[:, h // 5:h // 5 + 1, cs:],
                           kv_start=cs)
        assert_close(out[:, h:h + 1, rows], ref, dtype=torch.bfloat16)
    del q, k, v, out


@pytest.mark.gpu
def test_gpu_int64_offsets_long_decode():
    """A 2.2M-key cache in [B, S, H, D] storage (K/V row offsets past 2**31 elements)."""
    _needs_free_gib(12)
    S, Hq, Hkv, D = 2_200_000, 40, 8, 128
    q = torch.randn(1, Hq, 1, D, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(1, S, Hkv, D, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    v = torch.randn(1, S, Hkv, D, dtype=torch.bfloat16, device="cuda").transpose(1, 2)
    for chunk in (8192, None):
        out = chunked_attention(q, k, v, chunk_size=chunk)
        lo = 0 if chunk is None else (S - 1) // chunk * chunk
        for h in (0, Hq - 1):
            kh, vh = k[0, h // 5, lo:].float(), v[0, h // 5, lo:].float()
            p = torch.softmax(q[0, h].float() @ kh.T * D ** -0.5, dim=-1)
            assert_close(out[0, h], p @ vh, dtype=torch.bfloat16)

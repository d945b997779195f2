"""The quantized GEMMs, the training kernels and the experts-interface variants compile for
Hopper (sm90), on any machine.

The interpreter runs these kernels in fp16/fp32 only, and this project's CI has no GPU: so the
bf16 INT4 unpacking and the FP8 dots are compiled here for an sm90 target (Triton's bundled
ptxas, no GPU needed; in a subprocess, as the test session runs Triton in interpreter mode)
and the PTX is checked for Hopper's warpgroup MMA (wgmma) on tiled configs. Numerics of the
bf16 path are covered by the GPU tests and by the nibble test below. The attention backward's
16-bit launch configs (never measured on a GPU) are compiled the same way and must not spill.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import replace

import pytest
import torch

FORMATS = {"fp8_rowwise": 1, "fp8_block": 2, "int4_sym": 3, "int4_asym": 4}


def compiled_in_subprocess(*which: str) -> dict:
    """This file's compile step `which` (none: compile_all) run in a Python without the
    interpreter, its JSON result; skips where this triton has no sm90 toolchain. Fusion of
    floating-point multiply-adds stays on, the default a GPU launch compiles with."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, __file__, *which], env=env, capture_output=True, text=True, timeout=300)
    if run.returncode != 0 and ("ptxas" in run.stderr or "cuobjdump" in run.stderr):
        pytest.skip(f"this triton cannot compile for sm90 here: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _pointers(code: int, a: str, w: str, c: str, s: str, z: str, a_s: str) -> dict:
    fp8 = code <= 2
    return {a: "*fp8e4nv" if fp8 else "*bf16", w: "*fp8e4nv" if fp8 else "*u8", c: "*bf16",
            s: "*fp32" if fp8 else "*bf16", z: "*u8", a_s: "*fp32"}


def _compile(fn, types: dict, const: dict, num_warps: int, num_stages: int = 3, divisible=()):
    """fn compiled for sm90 (Triton's bundled ptxas, no GPU needed). Arguments take their type
    from `types` (a name ending in _ptr defaults to *fp32, any other to i32), `const` gives
    constexprs, every other constexpr option keeps its default (Llama 4's), and an argument the
    launcher leaves at None (default None, not typed: a bias, a descriptor) is a constexpr None.
    `divisible` arguments are specialised as multiples of 16, as a launch specialises aligned
    pointers and strides."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    const = dict(const)
    for param in fn.params:
        if param.name not in types and param.name not in const and (param.is_constexpr or param.default is None):
            const[param.name] = param.default
    sig = {n: "constexpr" if n in const else types.get(n, "*fp32" if n.endswith("_ptr") else "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def _quant_descriptors(code: int, a: str, w: str, block_m: int, block_n: int, block_k: int) -> dict:
    """Descriptor types of a quantized GEMM with tma, as the launchers build them: A [rows, K]
    in [block_m, block_k] blocks; FP8 weights K-contiguous (tiles of the transpose), packed INT4
    N-contiguous with half-height tiles."""
    fp8 = code <= 2
    act = "fp8e4nv" if fp8 else "bf16"
    weight = f"fp8e4nv[1,{block_n},{block_k}]" if fp8 else f"u8[1,{block_k // 2},{block_n}]"
    return {a: f"tensordesc<{act}[{block_m},{block_k}]>", w: f"tensordesc<{weight}>"}


def compile_all() -> dict:
    """{kernel/format[+tma]: {"wgmma", "e4m3", "tma": bool}} for the tiled configs, plain and with
    the TMA option (descriptors for the activations and the weights)."""
    qm = importlib.import_module("llama4_fast.kernels.quant_matmul")
    moe = importlib.import_module("llama4_fast.kernels.moe")
    out = {}
    for tma in (False, True):
        suffix = "+tma" if tma else ""
        for fmt, code in FORMATS.items():
            types = _pointers(code, "a_ptr", "w_ptr", "c_ptr", "s_ptr", "z_ptr", "a_scale_ptr")
            const = dict(WEIGHT_FORMAT=code, GROUP_K=128, DOT_PRECISION="tf32", BLOCK_M=128, BLOCK_N=128, BLOCK_K=64,
                         GROUP_M=8)
            if tma:
                types.update(_quant_descriptors(code, "a_desc", "w_desc", 128, 128, 64))
                const["W_TRANSPOSED"] = code <= 2
            ptx = _compile(qm._quant_matmul_kernel, types, const, num_warps=8).asm["ptx"]
            out[f"quant_matmul/{fmt}{suffix}"] = {"wgmma": "wgmma.mma_async" in ptx, "e4m3": "e4m3" in ptx,
                                                  "tma": "cp.async.bulk.tensor" in ptx}
        for fmt in ("fp8_block", "int4_asym"):
            code = FORMATS[fmt]
            types = _pointers(code, "a_ptr", "b_ptr", "c_ptr", "bs_ptr", "bz_ptr", "as_ptr")
            types.update(topk_ids_ptr="*i32", sorted_pairs_ptr="*i32", expert_offsets_ptr="*i32",
                         block_offsets_ptr="*i32")
            const = dict(A_ROW_DIV=1, DIRECT=False, GATED=False, SCALE_C=True, C_PARTIAL=False, DOT_PRECISION="tf32",
                         BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, BLOCK_B=256, WEIGHT_FORMAT=code, GROUP_K=128)
            if tma:  # the down GEMM: h in expert order through a descriptor too
                types.update(_quant_descriptors(code, "a_desc", "b_desc", 64, 64, 64))
                const.update(B_TRANSPOSED=code <= 2, A_BY_SLOT=True)
            ptx = _compile(moe._moe_gemm_kernel, types, const, num_warps=4).asm["ptx"]
            out[f"moe_down/{fmt}{suffix}"] = {"wgmma": "wgmma.mma_async" in ptx, "e4m3": "e4m3" in ptx,
                                              "tma": "cp.async.bulk.tensor" in ptx}
    return out


def test_quantized_kernels_compile_for_sm90_with_wgmma():
    """wgmma on every format (e4m3 operands for FP8), and TMA loads exactly with the option."""
    results = compiled_in_subprocess()
    assert len(results) == 12
    for name, r in results.items():
        assert r["wgmma"], f"{name}: no wgmma in the sm90 PTX"
        assert r["e4m3"] == ("fp8" in name), f"{name}: e4m3 operands {'missing' if 'fp8' in name else 'unexpected'}"
        assert r["tma"] == name.endswith("+tma"), f"{name}: TMA loads {'missing' if not r['tma'] else 'unexpected'}"


def _resource_usage(kernel) -> dict:
    """Registers and stack bytes a thread (ptxas, read back with the wheel's cuobjdump)."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    fields = {"regs": "REG", "stack": "STACK"}
    return {key: int(re.search(rf"{field}:(\d+)", usage).group(1)) for key, field in fields.items()}


def compile_attention_backward() -> dict:
    """{kernel/dtype/D: {"regs", "stack", "wgmma"}} for the dK/dV and dQ kernels with the
    launcher's 16-bit configs, at Llama 4's layout (GQA group 5, chunked, per-sequence starts,
    unit head-dim strides, 16-divisible pointers and strides as a launch specialises them)."""
    attn = importlib.import_module("llama4_fast.kernels.attention")
    out = {}
    for head_dim in (64, 128):
        for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            kv_cfg, q_cfg = attn._bwd_launch_config(head_dim, torch_dtype)
            for fn, cfg in ((attn._attn_bwd_dkdv, kv_cfg), (attn._attn_bwd_dq, q_cfg)):
                types = {n: "*" + dtype for n in ("Q", "K", "V", "DO", "DQ", "DK", "DV")}
                types.update(LSE="*fp32", Delta="*fp32", KVStart="*i64", qk_scale="fp32", scale="fp32")
                const = dict(GROUP=5, HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                             BLOCK_D=head_dim, CHUNKED=True, KV_START_TENSOR=True, INPUT_PRECISION="tf32")
                const.update({n: 1 for n in fn.arg_names if n.startswith("stride_") and n.endswith("d")})
                div = [n for n in fn.arg_names if (types.get(n, "").startswith("*")
                                                   or n.startswith("stride_")) and n not in const]
                kernel = _compile(fn, types, const, cfg.num_warps, cfg.num_stages, div + ["chunk_size"])
                usage = _resource_usage(kernel)
                usage["wgmma"] = "wgmma.mma_async" in kernel.asm["ptx"]
                out[f"{fn.__name__}/{dtype}/D{head_dim}"] = usage
    return out


def test_attention_backward_compiles_for_sm90_without_spills():
    results = compiled_in_subprocess("attention_backward")
    assert len(results) == 8
    for name, r in results.items():
        assert r["stack"] == 0, f"{name}: register spills ({r})"
        assert r["wgmma"], f"{name}: no wgmma in the sm90 PTX"


@pytest.mark.parametrize("dtype,bits,magic", [(torch.float16, 0x6400, 1024.0), (torch.bfloat16, 0x4300, 128.0),
                                              (torch.float32, 0x4B000000, 2.0 ** 23)])
def test_nibble_exponent_trick_is_exact(dtype, bits, magic):
    """dequant.py's nibble -> float: OR-ing u (0..15) into the pattern of MAGIC gives MAGIC + u."""
    u = torch.arange(16, dtype=torch.int32)
    int_type = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[dtype]
    values = (u | bits).to(int_type).view(dtype)
    assert torch.equal(values.double() - magic, u.double())


def compile_moe_training() -> dict:
    """{variant: {"regs", "stack", "wgmma"}} for the MoE kernels that no GPU run has compiled
    yet, in bf16 with the tiles the launchers pick at Scout's shape (T=8192, top-1): the
    forward that saves the pre-activations, with gpt-oss's options (biases, interleaved gate/up,
    the clamped SwiGLU); the SwiGLU-backward GEMM (dOut @ down^T); the weight-gradient GEMM."""
    moe = importlib.import_module("llama4_fast.kernels.moe")
    # the forward takes the H100 table on sm90, the backward the heuristic (fused_moe_backward)
    fwd = moe.select_config(8192, 1, 16, 5120, 8192, torch.bfloat16, num_sms=132, use_table=True)
    cfg = moe.select_config(8192, 1, 16, 5120, 8192, torch.bfloat16, num_sms=132, use_table=False)

    def build(fn, const, types, num_warps, num_stages):
        kernel = _compile(fn, types, const, num_warps, num_stages)
        usage = _resource_usage(kernel)
        usage["wgmma"] = "wgmma.mma_async" in kernel.asm["ptx"]
        return usage

    routing = dict(topk_ids_ptr="*i32", topk_weights_ptr="*fp32", sorted_pairs_ptr="*i32",
                   expert_offsets_ptr="*i32", block_offsets_ptr="*i32")
    def tiles(c, g):
        return dict(DIRECT=False, DOT_PRECISION="tf32", BLOCK_M=c.block_m, GROUP_M=g.group_m, BLOCK_B=256,
                    BLOCK_N=g.block_n, BLOCK_K=g.block_k)

    dense = dict(routing, a_ptr="*bf16", b_ptr="*bf16", c_ptr="*bf16", bs_ptr="*bf16", bz_ptr="*u8", as_ptr="*fp32")
    gated = dict(tiles(fwd, fwd.gate_up), A_ROW_DIV=1, GATED=True, SCALE_C=True, C_PARTIAL=False)
    g = fwd.gate_up
    out = {"forward (inference, for comparison)": build(moe._moe_gemm_kernel, dict(gated), dense, g.num_warps,
                                                        g.num_stages),
           "forward+preact": build(moe._moe_gemm_kernel, dict(gated, STORE_PREACT=True),
                                   dict(dense, preact_ptr="*bf16"), g.num_warps, g.num_stages),
           "forward+preact/gpt-oss options": build(
               moe._moe_gemm_kernel, dict(gated, SCALE_C=False, STORE_PREACT=True, GATE_UP_INTERLEAVED=True,
                                          ACTIVATION=moe.CLAMPED_SWIGLU.value),
               dict(dense, preact_ptr="*bf16", bias_ptr="*bf16", glu_limit="fp32", glu_alpha="fp32"), g.num_warps,
               g.num_stages)}
    g = cfg.gate_up
    common = tiles(cfg, g)
    out["swiglu backward (dOut @ down^T)"] = build(
        moe._moe_gemm_kernel,
        dict(common, A_ROW_DIV=1, GATED=False, SCALE_C=False, C_PARTIAL=False, SWIGLU_BWD=True),
        dict(dense, preact_ptr="*bf16", h_ptr="*bf16", dw_ptr="*fp32"), g.num_warps, g.num_stages)
    block_p, block_k, block_n, warps, stages = moe._wgrad_config(torch.bfloat16)
    out["weight gradient"] = build(
        moe._moe_wgrad_kernel,
        dict(A_ROW_DIV=1, B_ROW_DIV=1, DOT_PRECISION="tf32", BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_N=block_n,
             GROUP_M=8),
        dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*bf16", sorted_pairs_ptr="*i32", expert_offsets_ptr="*i32"),
        warps, stages)
    return out


def test_moe_training_and_variant_kernels_compile_for_sm90():
    """Compiled, with wgmma; spills are reported, not failed on: these tiles are the heuristic's
    (not measured), and a GPU run decides them."""
    results = compiled_in_subprocess("moe_training")
    assert len(results) == 5
    for name, r in results.items():
        assert r["wgmma"], f"{name}: no wgmma in the sm90 PTX ({r})"
        print(f"{name}: {r}")


def compile_moe_hopper() -> dict:
    """{case: {"regs", "stack", "wgmma", "tma", "pdl"}} for the bf16 MoE GEMMs at the H100 table's
    tiles, plain and with MoeConfig's Hopper options (tma, epilogue_block_n=64, pdl): Scout
    prefill (T=8192) and TP8 decode (T=1, K split), and gpt-oss-120b's prefill (T=2048, top-4,
    heuristic tiles; interleaved gate/up, clamped SwiGLU, biases), as a launch specialises them
    (16-divisible pointers and row strides, tensor descriptors for the weights and the down
    GEMM's A)."""
    moe = importlib.import_module("llama4_fast.kernels.moe")
    fn = moe._moe_gemm_kernel
    pointers = dict(topk_ids_ptr="*i32", topk_weights_ptr="*fp32", sorted_pairs_ptr="*i32", expert_offsets_ptr="*i32",
                    block_offsets_ptr="*i32", a_ptr="*bf16", b_ptr="*bf16", c_ptr="*bf16", bs_ptr="*bf16",
                    bz_ptr="*u8", as_ptr="*fp32")
    gpt_oss = dict(GATE_UP_INTERLEAVED=True, ACTIVATION=moe.CLAMPED_SWIGLU.value)
    cases = {"scout prefill": (8192, 1, 16, 5120, 8192, {}), "TP8 decode": (1, 1, 128, 5120, 1024, {}),
             "gpt-oss prefill": (2048, 4, 128, 2880, 2880, gpt_oss)}
    out = {}
    for case, (T, top_k, E, H, I, variant) in cases.items():
        plain = moe.select_config(T, top_k, E, H, I, torch.bfloat16, num_sms=132, use_table=True)
        for hopper in (False, True):
            cfg = replace(plain, tma=hopper, epilogue_block_n=64 if hopper else None, pdl=hopper)
            for gemm, g, gated in (("gate_up", cfg.gate_up, True), ("down", cfg.down, False)):
                const = dict(DIRECT=cfg.direct(T * top_k), DOT_PRECISION="tf32", BLOCK_M=cfg.block_m,
                             GROUP_M=g.group_m, BLOCK_B=256, BLOCK_N=g.block_n, BLOCK_K=g.block_k, A_ROW_DIV=1,
                             GATED=gated, SCALE_C=gated and not variant, C_PARTIAL=g.split_k > 1 or top_k > 1,
                             EPILOGUE_SPLIT=cfg.epilogue_split(g), PDL=cfg.pdl, **(variant if gated else {}))
                ptrs = dict(pointers, bias_ptr="*bf16") if variant else pointers
                descs = {}
                if hopper:
                    width = 2 * g.block_n if gated and variant else g.block_n
                    descs["b_desc"] = f"tensordesc<bf16[1,{g.block_k},{width}]>"
                    if gated:
                        const["C_BY_SLOT"] = True
                    else:
                        descs["a_desc"] = f"tensordesc<bf16[{cfg.block_m},{g.block_k}]>"
                        const["A_BY_SLOT"] = True
                types = dict(ptrs, **descs)
                if const["C_PARTIAL"]:
                    types["c_ptr"] = "*fp32"
                if gated and variant:
                    types.update(glu_limit="fp32", glu_alpha="fp32")
                div = [n for n in ptrs] + ["stride_be", "stride_bk", "stride_am", "stride_cm", "c_split_stride"]
                kernel = _compile(fn, types, const, g.num_warps, g.num_stages, div)
                usage = _resource_usage(kernel)
                ptx = kernel.asm["ptx"]
                usage.update(wgmma="wgmma.mma_async" in ptx, tma="cp.async.bulk.tensor" in ptx,
                             pdl="griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx)
                out[f"{case}/{gemm}/{'hopper' if hopper else 'plain'}"] = usage
    return out


def test_moe_hopper_options_compile_for_sm90_with_tma_and_without_spills():
    """The Hopper options load through TMA, wait on the previous grid (griddepcontrol) and leave
    no spills at the table's tiles (the wide prefill tiles spill without them: reported, as a
    GPU run decides between the two)."""
    results = compiled_in_subprocess("moe_hopper")
    assert len(results) == 12
    for name, r in results.items():
        print(f"{name}: {r}")
        hopper = name.endswith("hopper")
        for what in ("tma", "pdl"):
            assert r[what] == hopper, f"{name}: {what} instructions {'missing' if hopper else 'unexpected'} ({r})"
        assert r["wgmma"] or name.startswith("TP8 decode"), f"{name}: no wgmma ({r})"
        if hopper:
            assert r["stack"] == 0, f"{name}: register spills ({r})"


def compile_attention_forward() -> dict:
    """{variant: {"regs", "stack", "shared", "tma", "wgmma"}} for the forward kernel's TMA variant
    (kernels.attention.forward_variant: K/V tiles through host-side tensor descriptors) at
    Llama 4's prefill (GQA group 5, chunked, head dim 128, the 16-bit prefill table's 128 query
    rows and 8 warps), with 64- and 128-key tiles, and the pointer path's 128-key tiles beside
    them; pointers and strides 16-divisible as a launch specialises them."""
    attn = importlib.import_module("llama4_fast.kernels.attention")
    fn, out = attn._attn_fwd, {}
    for dtype, block_n, tma in (("bf16", 64, True), ("fp16", 64, True), ("bf16", 128, True), ("fp16", 128, True),
                                ("bf16", 128, False)):
        with attn.forward_variant(tma=tma, block_n=block_n):  # the variant's config, as a launch takes it
            cfg = attn._forward_config(128, getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype]), False,
                                       8192, *[torch.empty(1, 1, 8192, 128)] * 2)
        assert (cfg.block_n, cfg.tma) == (block_n, tma), cfg
        kv = f"tensordesc<{dtype}[1,1,{block_n},128]>" if tma else "*" + dtype
        types = dict(Q="*" + dtype, K=kv, V=kv, Out="*" + dtype, PartialO="*fp32", PartialLSE="*fp32",
                     KVStart="*i64", KVLen="*i32", qk_scale="fp32")
        const = dict(GROUP=5, PACK=1, HEAD_DIM=128, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=128,
                     CHUNKED=True, KV_START_TENSOR=False, KV_LEN_TENSOR=False, SPLIT=False, STORE_LSE=False,
                     KV_TMA=tma, INPUT_PRECISION="tf32", stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1)
        div = [n for n in fn.arg_names if (types.get(n, "").startswith("*") or n.startswith("stride_"))
               and n not in const]
        kernel = _compile(fn, types, const, cfg.num_warps, cfg.num_stages, div + ["chunk_size"])
        usage = _resource_usage(kernel)
        ptx = kernel.asm["ptx"]
        usage.update(shared=kernel.metadata.shared, tma="cp.async.bulk.tensor" in ptx, wgmma="wgmma.mma_async" in ptx)
        out[f"{'tma' if tma else 'pointers'}/{dtype}/BLOCK_N={block_n}/stages={cfg.num_stages}"] = usage
    return out


def test_attention_forward_tma_variant_compiles_for_sm90():
    """TMA (cp.async.bulk.tensor) and wgmma in the TMA variant's PTX, within the 227 KiB of shared
    memory. 64-key tiles do not spill; 128-key tiles do on triton 3.9 (255 registers and a small
    stack, as the pointer path's 128-key tiles): reported, not failed on, for a GPU run to weigh."""
    results = compiled_in_subprocess("attention_forward")
    assert len(results) == 5
    for name, r in results.items():
        print(f"{name}: {r}")
        assert r["wgmma"], f"{name}: no wgmma in the sm90 PTX ({r})"
        assert r["tma"] == name.startswith("tma"), f"{name}: TMA {'missing' if r['tma'] else 'unexpected'} ({r})"
        assert r["shared"] <= 227 * 1024, f"{name}: {r['shared']} bytes of shared memory"
        if "BLOCK_N=64" in name:
            assert r["stack"] == 0, f"{name}: register spills ({r})"


if __name__ == "__main__":
    which = sys.argv[1:]
    print(json.dumps(compile_attention_backward() if which == ["attention_backward"] else
                     compile_attention_forward() if which == ["attention_forward"] else
                     compile_moe_training() if which == ["moe_training"] else
                     compile_moe_hopper() if which == ["moe_hopper"] else compile_all()))

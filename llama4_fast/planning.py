"""Will it fit? Memory per GPU of a Llama 4 served by the thin model, before loading anything.

    llama4_fast.memory_plan("scout", "int4", context=32768)          # a preset
    llama4_fast.memory_plan("path/to/checkpoint", "fp8", gpus=8)     # its config.json
    llama4-fast plan maverick --weights fp8 --gpus 8                 # the same, as a table

Everything is computed from the config (shapes) and the weight scheme; nothing is measured.
What is counted, per GPU (bytes; a = bytes of the model dtype, bf16 unless asked):

Weights, in the layouts `llama4_fast.quantize` produces (llama4_fast.quant), per [*lead, K, N]
weight used as x @ W (an nn.Linear [N, K] counts as [K, N]):
    bf16        lead K N a
    fp8         lead (K N + 4 N)                      e4m3 + a float32 scale per output channel
    fp8_tensor  lead (K N + 4)                        one float32 scale per tensor / expert
    fp8_block   lead (K N + 4 cdiv(K,128) cdiv(N,128)) float32 scale per 128x128 block
    int4        lead (K N / 2 + a K N / G)            packed uint8 [K/2, N], scales [K/G, N] in
                                                      the model dtype (G the group size)
    int4_asym   int4 + lead K N / G                   uint8 zero points [K/G, N]
The routed experts take the scheme; the shared expert, the dense FFN layers and the attention
projections only when asked (`shared_expert`, `dense_ffn`, `attention`: `quantize`'s options);
routers, norms, embeddings and the LM head stay in the model dtype (a tied LM head counts once).

KV cache (`Llama4.setup_caches(batch, context)`): K and V [batch, Hkv, L, D] per layer in the
model dtype, L = context on global (NoPE) layers, min(context, chunk) on chunked ones:
    KV = 2 batch Hkv D a (n_global context + n_chunked min(context, chunk)).
`context` is the caches' length: prompt plus new tokens (`generate` sets up S + max_new_tokens).

Activations: an estimate of the tensors alive at once in the largest prefill piece
(`Llama4.prefill` runs pieces of `piece` tokens, default the attention chunk; one piece is
T = batch min(piece, context) tokens; R = T top_k routed rows):
    base   3 T H a              residual x, h = x + attention, the normed input
           + 4 T D              RoPE cos and sin (float32, D/2 each)
           + batch V a          last-position logits
    attn   T a (2 Hq D + 2 Hkv D + H)        q, k after the prologue, v, output, o_proj output
           + T Hq D + 4 T       FP8 attention: o_proj's input quantized per token
           + 2 batch Hkv D a min(chunk, context)   when piece is not a multiple of the chunk:
                                the cached prefix copied before the new keys
    moe    T E a + 8 R          router logits, routing weights (fp32) and ids (int32)
           + R I a + T H a      the routed SwiGLU output h [R, I], the routed output
           + 4 R H              top_k > 1: fp32 partials of the down GEMM
           + T H + R I + 4 (T + R)   FP8 experts: x and h quantized per token
           + 3 T I a + T H a    shared expert: gate, up, their product; its output
           + T max(H, I) + 4 T  FP8 shared expert: its input quantized per token
           + 3 R H a + 16 R + 4 T H   expert parallel (gpus > 1): rows sent, received and
                                returned (balanced routing), their (id, weight) pairs, the fp32 sum
    dense  3 T I_mlp a + T H a  + T I_mlp + 4 T when FP8
    peak = base + max(attn, moe if any MoE layer, dense if any dense layer)
Decode steps (T = batch) and their CUDA graph pool are far smaller and left to the workspace.

Workspace: WORKSPACE_GIB (2 GiB, an assumption): CUDA context and kernel images, cuBLAS and
Triton workspaces, the decode step's graph pool, and the caching allocator's fragmentation.

Several GPUs: expert parallelism over the thin model (`llama4_fast.parallel.shard_experts`),
the one placement the thin model supports: each GPU keeps E / gpus routed experts and a full
replica of everything else, and runs its own `batch` sequences (data-parallel attention), so
KV cache and activations are per GPU too. This is the steady state after sharding: loading
today reads the whole model on every rank before `shard_experts` cuts it (docs/scaling.md).
(Under transformers' tensor parallelism, also supported, weights and KV split differently;
docs/scaling.md has that arithmetic.)

`max_context` is the largest context (caches' length) that fits at this batch, up to the
config's max_position_embeddings; memory only grows with the context, so a binary search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from llama4_fast.config import MODEL_DTYPES, Llama4Config
from llama4_fast.kernels.quant_matmul import int4_group_size_args
from llama4_fast.quant import SCHEMES

GIB = 2**30
DEFAULT_GPU_GIB = 80.0
# An assumption, not a measurement: CUDA context and kernel images (about 0.5-1 GiB on Hopper),
# cuBLAS / Triton workspaces, the decode CUDA-graph pool, allocator fragmentation.
WORKSPACE_GIB = 2.0
WEIGHT_SCHEMES = ("bf16",) + tuple(SCHEMES)
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_FP8_SCALE_BYTES = 4  # float32

# The published text configs (meta-llama/Llama-4-{Scout-17B-16E,Maverick-17B-128E}-Instruct
# config.json, text_config): the fields that size memory, read through the same
# Llama4Config.from_hf as a checkpoint directory.
_PUBLISHED = dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
                  num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                  num_experts_per_tok=1, attention_chunk_size=8192, no_rope_layer_interval=4,
                  tie_word_embeddings=False, torch_dtype="bfloat16")
PRESETS = {
    "scout": dict(_PUBLISHED, num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
                  max_position_embeddings=10485760),
    "maverick": dict(_PUBLISHED, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                     max_position_embeddings=1048576),
}


class PlanArgumentError(ValueError):
    """A `memory_plan` argument out of range; `argument` names it (the command line maps it to
    its flag)."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument = argument


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU by part, and whether they fit in `gpu_bytes` (see the module docstring for
    every formula). `max_context`: the largest context that fits at this batch (0: none),
    at most `context_limit` (the config's max_position_embeddings)."""

    model: str
    weights: str                   # scheme: "bf16", or one of llama4_fast.quantize's
    group_size: int | None         # int4 schemes only
    quantized: tuple[str, ...]     # the parts in the scheme (besides, when not bf16)
    dtype: str                     # model dtype: unquantized weights, KV cache, activations
    batch: int                     # sequences per GPU
    context: int                   # caches' length: prompt + new tokens
    piece: int                     # prefill piece, tokens per sequence
    gpus: int
    experts_per_gpu: int
    num_experts: int
    n_moe_layers: int
    n_global_layers: int
    n_chunked_layers: int
    chunk: int | None
    gpu_bytes: int
    # bytes per GPU
    attention: int
    routed_experts: int
    shared_experts_routers: int
    dense_ffn: int
    embeddings: int
    lm_head: int
    norms: int
    kv_cache: int
    activations: int
    workspace: int
    max_context: int
    context_limit: int

    @property
    def weight_bytes(self) -> int:
        return (self.attention + self.routed_experts + self.shared_experts_routers + self.dense_ffn
                + self.embeddings + self.lm_head + self.norms)

    @property
    def total(self) -> int:
        return self.weight_bytes + self.kv_cache + self.activations + self.workspace

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_bytes

    @property
    def placement(self) -> str:
        if self.gpus == 1:
            return "1 GPU holds the whole model"
        return (f"expert parallel over {self.gpus} GPUs (llama4_fast.parallel.shard_experts): "
                f"{self.experts_per_gpu} of {self.num_experts} routed experts per GPU, everything else "
                f"replicated; each GPU runs its own batch of {self.batch}")

    def verdict(self) -> str:
        need, have = self.total / GIB, self.gpu_bytes / GIB
        head = (f"fits: {need:.1f} of {have:.1f} GiB per GPU" if self.fits
                else f"does not fit: {need:.1f} GiB per GPU needed, {have:.1f} GiB available")
        if self.max_context == 0:
            fixed = (self.weight_bytes + self.workspace) / GIB
            return f"{head}; no context fits at batch {self.batch} (weights + workspace alone: {fixed:.1f} GiB)"
        tail = f"largest context at batch {self.batch}: {self.max_context:,} tokens"
        if self.max_context == self.context_limit:
            tail += " (the config's max_position_embeddings; more would fit)"
        if self.context > self.context_limit:
            head += f" (context {self.context:,} is past the config's max_position_embeddings)"
        return f"{head}; {tail}"

    def table(self) -> str:
        """A markdown table of the parts, GiB and GB per GPU."""
        scheme = self.weights + (f" g{self.group_size}" if self.group_size else "")
        dt = _SHORT[self.dtype]

        def fmt(part):
            return scheme if part in self.quantized else dt

        L = self.n_global_layers + self.n_chunked_layers
        n_dense = L - self.n_moe_layers
        experts = f"{self.experts_per_gpu} of {self.num_experts}" if self.gpus > 1 else f"{self.num_experts}"
        shared = (f"shared experts + routers ({dt})" if fmt("shared experts") == dt
                  else f"shared experts ({fmt('shared experts')}) + routers ({dt})")
        kv = f"batch {self.batch}: {self.n_global_layers} global layers x {self.context:,}"
        if self.n_chunked_layers:
            kv += f" + {self.n_chunked_layers} chunked x {min(self.context, self.chunk):,}"
        rows = [
            (f"attention ({L} layers, {fmt('attention')})", self.attention),
            (f"routed experts ({self.n_moe_layers} MoE layers x {experts} experts, "
             f"{scheme if self.weights != 'bf16' else dt})", self.routed_experts),
            (shared, self.shared_experts_routers),
            (f"dense FFN ({n_dense} layers, {fmt('dense FFN')})" if n_dense else "dense FFN (none: every layer is MoE)",
             self.dense_ffn),
            (f"embeddings ({dt})", self.embeddings),
            ("LM head (tied to the embeddings)" if self.lm_head == 0 else f"LM head ({dt})", self.lm_head),
            (f"norms ({dt})", self.norms),
            ("**weights**", self.weight_bytes),
            (f"KV cache ({kv} positions, {dt})", self.kv_cache),
            (f"activations (prefill piece {self.batch} x {min(self.piece, self.context):,} tokens, estimate)",
             self.activations),
            (f"workspace (CUDA context, allocator slack: {self.workspace / GIB:g} GiB assumed)", self.workspace),
            ("**total per GPU**", self.total),
        ]
        lines = ["| part | GiB | GB |", "|---|---:|---:|"]
        lines += [f"| {name} | {b / GIB:,.2f} | {b / 1e9:,.2f} |" for name, b in rows]
        lines.append(f"| GPU memory | {self.gpu_bytes / GIB:,.2f} | {self.gpu_bytes / 1e9:,.2f} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return (f"{self.model}: {self.weights} weights, batch {self.batch}, context {self.context:,}, "
                f"model dtype {_SHORT[self.dtype]}\nplacement: {self.placement}\n\n{self.table()}\n\n"
                f"{self.verdict()}")


# ----------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------

def memory_plan(model: str | Path | dict | Llama4Config, weights: str = "bf16", *, group_size: int = 128,
                batch: int = 1, context: int = 8192, gpus: int = 1, gpu_gib: float = DEFAULT_GPU_GIB,
                shared_expert: bool = False, dense_ffn: bool = False, attention: bool = False,
                piece: int | None = None, dtype: str | None = None,
                workspace_gib: float = WORKSPACE_GIB) -> MemoryPlan:
    """Memory per GPU of `model` served by the thin model (see the module docstring).

    model: "scout" / "maverick" (the published configs), a checkpoint directory or its
        config.json (read by Llama4Config.from_hf; prefix a directory named like a preset
        with "./"), a config dict or a Llama4Config.
    weights: "bf16" (the model dtype, unquantized) or a `llama4_fast.quantize` scheme; the
        routed experts take it, and the shared expert / dense FFN / attention when asked. A
        checkpoint's own quantization_config is not read: name the scheme it holds.
    group_size: INT4 rows of K per scale (a power of two >= 32 dividing every quantized K).
    batch: sequences per GPU; context: the caches' length (prompt + new tokens).
    gpus, gpu_gib: GPUs (expert parallel when > 1; must divide the number of experts) and
        memory per GPU in GiB. piece: prefill piece (default: as `Llama4.prefill`).
    dtype: the model dtype (default: the config's, else bfloat16).
    Raises PlanArgumentError (a ValueError) naming the argument; the config's own errors
    (FileNotFoundError, ValueError naming the file) as Llama4Config.from_hf raises them."""
    name, cfg = _config(model)
    scheme = _choice("weights", weights, WEIGHT_SCHEMES)
    for arg, value in (("batch", batch), ("context", context), ("gpus", gpus)):
        _positive("int", arg, value)
    _positive("int", "piece", piece, allow_none=True)
    _positive("number", "gpu_gib", gpu_gib)
    _positive("number", "workspace_gib", workspace_gib, allow_zero=True)
    dtype = _choice("dtype", dtype if dtype is not None else (cfg.torch_dtype or "bfloat16"), tuple(MODEL_DTYPES))
    E = cfg.num_local_experts
    if E % gpus:
        raise PlanArgumentError("gpus", f"{gpus} GPUs do not divide num_local_experts={E}: expert parallelism gives "
                                        f"every GPU the same number of experts (choose among "
                                        f"{[w for w in range(1, E + 1) if E % w == 0]})")
    quantized = _quantized_parts(scheme, shared_expert, dense_ffn, attention)
    if scheme.startswith("int4"):
        try:
            int4_group_size_args(group_size)
        except ValueError as e:
            raise PlanArgumentError("group_size", str(e).removeprefix("group_size ")) from None
        _check_group_divides(cfg, group_size, quantized)
    parts = weight_bytes(cfg, scheme, group_size, dtype=dtype, shared_expert=shared_expert, dense_ffn=dense_ffn,
                         attention=attention)
    parts["routed_experts"] //= gpus  # E / gpus whole experts: exact
    piece = piece if piece is not None else (cfg.attention_chunk_size or 8192)  # as Llama4.prefill
    fixed = sum(parts.values()) + int(workspace_gib * GIB)
    gpu_bytes = int(gpu_gib * GIB)

    def per_context(n: int) -> tuple[int, int]:
        return (kv_cache_bytes(cfg, batch, n, dtype=dtype),
                activation_bytes(cfg, batch, n, piece=piece, scheme=scheme, quantized=quantized, gpus=gpus,
                                 dtype=dtype))

    limit = cfg.max_position_embeddings
    lo, hi = 0, limit  # fits at lo (0: nothing, by convention); find the last n <= limit that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fixed + sum(per_context(mid)) <= gpu_bytes:
            lo = mid
        else:
            hi = mid - 1
    kv, act = per_context(context)
    n_global = sum(not cfg.is_chunked(i) for i in range(cfg.num_hidden_layers))
    return MemoryPlan(
        model=name, weights=scheme, group_size=group_size if scheme.startswith("int4") else None,
        quantized=quantized, dtype=dtype, batch=batch, context=context, piece=piece, gpus=gpus,
        experts_per_gpu=E // gpus, num_experts=E, n_moe_layers=len(set(cfg.moe_layers)), n_global_layers=n_global,
        n_chunked_layers=cfg.num_hidden_layers - n_global, chunk=cfg.attention_chunk_size, gpu_bytes=gpu_bytes,
        **parts, kv_cache=kv, activations=act, workspace=int(workspace_gib * GIB), max_context=lo,
        context_limit=limit)


def weight_bytes(cfg: Llama4Config, scheme: str = "bf16", group_size: int = 128, *, dtype: str = "bfloat16",
                 shared_expert: bool = False, dense_ffn: bool = False, attention: bool = False) -> dict[str, int]:
    """Bytes of the whole model's weights by part (no sharding), as `quantize(model, scheme,
    group_size, shared_expert=..., dense_ffn=..., attention=...)` leaves them."""
    a = _DTYPE_BYTES[dtype]
    H, I, I_mlp, D, E = (cfg.hidden_size, cfg.intermediate_size, cfg.intermediate_size_mlp, cfg.head_dim,
                         cfg.num_local_experts)
    Hq, Hkv, L, V = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers, cfg.vocab_size
    n_moe = len(set(cfg.moe_layers))
    n_dense = L - n_moe

    def linears(shapes, quantize: bool) -> int:
        return sum(_matrix_bytes(K, N, 1, scheme if quantize else "bf16", group_size, a) for K, N in shapes)

    attn = [(H, Hq * D), (H, Hkv * D), (H, Hkv * D), (Hq * D, H)]  # q, k, v, o as [K, N]
    mlp = [(H, I), (H, I), (I, H)]  # gate, up, down
    dense = [(H, I_mlp), (H, I_mlp), (I_mlp, H)]
    routed = _matrix_bytes(H, 2 * I, E, scheme, group_size, a) + _matrix_bytes(I, H, E, scheme, group_size, a)
    return dict(
        attention=L * linears(attn, attention),
        routed_experts=n_moe * routed,
        shared_experts_routers=n_moe * (linears(mlp, shared_expert) + H * E * a),
        dense_ffn=n_dense * linears(dense, dense_ffn),
        embeddings=V * H * a,
        lm_head=0 if cfg.tie_word_embeddings else V * H * a,
        norms=(2 * L + 1) * H * a,  # input / post-attention norms per layer, the final norm (qk-norm has no weight)
    )


def kv_cache_bytes(cfg: Llama4Config, batch: int, context: int, *, dtype: str = "bfloat16") -> int:
    """K and V of `Llama4.setup_caches(batch, context)`: global layers hold `context` columns,
    chunked layers min(chunk, context)."""
    per_column = 2 * batch * cfg.num_key_value_heads * cfg.head_dim * _DTYPE_BYTES[dtype]
    columns = sum(min(cfg.attention_chunk_size, context) if cfg.is_chunked(i) else context
                  for i in range(cfg.num_hidden_layers))
    return per_column * columns


def activation_bytes(cfg: Llama4Config, batch: int, context: int, *, piece: int, scheme: str = "bf16",
                     quantized: tuple[str, ...] = (), gpus: int = 1, dtype: str = "bfloat16") -> int:
    """The estimate of the largest prefill piece's live tensors (formula: module docstring)."""
    a = _DTYPE_BYTES[dtype]
    H, I, I_mlp, D, E = (cfg.hidden_size, cfg.intermediate_size, cfg.intermediate_size_mlp, cfg.head_dim,
                         cfg.num_local_experts)
    Hq, Hkv, k, V, C = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_experts_per_tok, cfg.vocab_size,
                        cfg.attention_chunk_size)
    T = batch * min(piece, context)
    R = T * k
    fp8 = scheme.startswith("fp8")
    base = 3 * T * H * a + 4 * T * D + batch * V * a
    attn = T * a * (2 * Hq * D + 2 * Hkv * D + H)
    if fp8 and "attention" in quantized:
        attn += T * Hq * D + 4 * T
    if C is not None and piece % C and any(cfg.is_chunked(i) for i in range(cfg.num_hidden_layers)):
        attn += 2 * batch * Hkv * D * a * min(C, context)
    peaks = [attn]
    if cfg.moe_layers:
        moe = T * E * a + 8 * R + R * I * a + T * H * a + 3 * T * I * a + T * H * a
        if k > 1:
            moe += 4 * R * H
        if fp8:
            moe += T * H + R * I + 4 * (T + R)
        if fp8 and "shared experts" in quantized:
            moe += T * max(H, I) + 4 * T
        if gpus > 1:
            moe += 3 * R * H * a + 16 * R + 4 * T * H
        peaks.append(moe)
    if len(set(cfg.moe_layers)) < cfg.num_hidden_layers:
        dense = 3 * T * I_mlp * a + T * H * a
        if fp8 and "dense FFN" in quantized:
            dense += T * I_mlp + 4 * T
        peaks.append(dense)
    return base + max(peaks)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _matrix_bytes(K: int, N: int, lead: int, scheme: str, group_size: int, a: int) -> int:
    """Bytes of `lead` weights of logical shape [K, N] in `scheme` (llama4_fast.quant layouts)."""
    if scheme == "bf16":
        return lead * K * N * a
    if scheme == "fp8":
        return lead * (K * N + _FP8_SCALE_BYTES * N)
    if scheme == "fp8_tensor":
        return lead * (K * N + _FP8_SCALE_BYTES)
    if scheme == "fp8_block":
        return lead * (K * N + _FP8_SCALE_BYTES * math.ceil(K / 128) * math.ceil(N / 128))
    groups = K // group_size * N
    return lead * (K // 2 * N + a * groups + (groups if scheme == "int4_asym" else 0))


def _quantized_parts(scheme: str, shared_expert: bool, dense_ffn: bool, attention: bool) -> tuple[str, ...]:
    if scheme == "bf16":
        if shared_expert or dense_ffn or attention:
            flag = next(n for n, v in (("shared_expert", shared_expert), ("dense_ffn", dense_ffn),
                                       ("attention", attention)) if v)
            raise PlanArgumentError(flag, "applies to a quantized scheme, not weights='bf16'")
        return ()
    wanted = (("routed experts", True), ("shared experts", shared_expert), ("dense FFN", dense_ffn),
              ("attention", attention))
    return tuple(part for part, on in wanted if on)


def _check_group_divides(cfg: Llama4Config, group_size: int, quantized: tuple[str, ...]):
    """Every quantized weight's K must be a multiple of the group (as `quantize` checks)."""
    H, I, I_mlp, QD = cfg.hidden_size, cfg.intermediate_size, cfg.intermediate_size_mlp, \
        cfg.num_attention_heads * cfg.head_dim
    depths = {"routed experts": (H, I), "shared experts": (H, I), "dense FFN": (H, I_mlp), "attention": (H, QD)}
    for part in quantized:
        for K in depths[part]:
            if K % group_size:
                raise PlanArgumentError("group_size", f"{group_size} does not divide K={K} of the {part}; choose a "
                                                      f"power of two >= 32 dividing it")


def _config(model) -> tuple[str, Llama4Config]:
    if isinstance(model, Llama4Config):
        return "config", model
    if isinstance(model, dict):
        return "config", Llama4Config.from_hf(model)
    if isinstance(model, str) and model in PRESETS:
        return model, Llama4Config.from_hf(PRESETS[model])
    if not isinstance(model, (str, Path)):
        raise TypeError(f"model must be a preset name, a path, a config dict or a Llama4Config, "
                        f"got {type(model).__name__}")
    if not Path(model).exists():
        raise FileNotFoundError(f"{model}: neither a preset ({', '.join(PRESETS)}) nor an existing checkpoint "
                                "directory or config.json")
    return str(model), Llama4Config.from_hf(model)


def _choice(argument: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise PlanArgumentError(argument, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _positive(kind: str, argument: str, value, allow_none: bool = False, allow_zero: bool = False):
    if value is None and allow_none:
        return
    ok_type = isinstance(value, int) if kind == "int" else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not (value >= 0 if allow_zero else value > 0) \
            or not math.isfinite(value):
        raise PlanArgumentError(argument, f"must be a {'non-negative' if allow_zero else 'positive'} {kind}, "
                                          f"got {value!r}")

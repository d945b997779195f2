"""A thin Llama 4 text model that calls only `llama4_fast.ops` for its hot paths.

Modules and parameter names mirror transformers' Llama4TextModel (`layers.3.self_attn.q_proj.weight`,
`layers.0.feed_forward.experts.gate_up_proj`, ...) so checkpoints load without a renaming table
and `Llama4.from_hf` can share a loaded transformers model's parameters without copying.

Shapes: B batch, S new tokens, H hidden, Hq/Hkv query/KV heads, D head dim, E experts,
I expert intermediate size. Positions are absolute: token s of a call at `start_pos` sits at
position start_pos + s, the same for every sequence of the batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama4_fast import ops
from llama4_fast.config import Llama4Config, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


class KVCache(nn.Module):
    """Static K/V cache of one attention layer, [B, Hkv, L, D] each.

    Global layers keep every position (L = max_seq_len, slot = position). Chunked layers keep
    only the current chunk (L = chunk size, slot = position % C): a query never sees an earlier
    chunk, so at decode the visible keys are exactly slots [0, position % C].
    """

    def __init__(self, batch: int, kv_heads: int, length: int, head_dim: int, dtype, device, chunk_size=None):
        super().__init__()
        shape = (batch, kv_heads, length, head_dim)
        self.chunk_size = chunk_size
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v [B, Hkv, S, D] for positions pos..pos+S-1; return (keys, values, kv_start)
        covering every key those queries may attend, in the layout `ops.attention` takes."""
        B, S = k.shape[0], k.shape[2]
        kc, vc = self.k[:B], self.v[:B]
        C = self.chunk_size
        if C is None:
            if pos + S > kc.shape[2]:
                raise ValueError(f"positions up to {pos + S} exceed the cache length {kc.shape[2]}; "
                                 "call setup_caches with a larger max_seq_len")
            kc[:, :, pos:pos + S] = k
            vc[:, :, pos:pos + S] = v
            return kc[:, :, :pos + S], vc[:, :, :pos + S], 0
        chunk_start = pos // C * C
        last_chunk_start = (pos + S - 1) // C * C
        if chunk_start == last_chunk_start:  # decode, or a prefill inside one chunk: no copy
            kc[:, :, pos - chunk_start:pos - chunk_start + S] = k
            vc[:, :, pos - chunk_start:pos - chunk_start + S] = v
            end = pos - chunk_start + S
            return kc[:, :, :end], vc[:, :, :end], chunk_start
        # The new tokens cross a chunk boundary: attend over cached prefix + new keys, then keep
        # only the tokens of the last chunk they reach.
        keys = torch.cat([kc[:, :, :pos - chunk_start], k], dim=2)
        values = torch.cat([vc[:, :, :pos - chunk_start], v], dim=2)
        n_last = pos + S - last_chunk_start
        kc[:, :, :n_last] = k[:, :, S - n_last:]
        vc[:, :, :n_last] = v[:, :, S - n_last:]
        return keys, values, chunk_start


class Attention(nn.Module):
    def __init__(self, cfg: Llama4Config, layer: int):
        super().__init__()
        H, D = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, D
        self.q_proj = nn.Linear(H, self.n_heads * D, bias=False)
        self.k_proj = nn.Linear(H, self.n_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(H, self.n_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=False)
        self.use_rope = bool(cfg.no_rope_layers[layer])
        self.chunk_size = cfg.attention_chunk_size if cfg.is_chunked(layer) else None
        self.qk_norm_eps = cfg.rms_norm_eps if (cfg.use_qk_norm and self.use_rope) else None
        # NoPE layers scale the query by a position-dependent temperature.
        self.temperature = (cfg.floor_scale, cfg.attn_scale) if (cfg.attn_temperature_tuning and not self.use_rope) else None
        self.kv_cache: KVCache | None = None

    def forward(self, x, start_pos: int, cos, sin):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            q, k = ops.rope(q, cos, sin), ops.rope(k, cos, sin)
            if self.qk_norm_eps is not None:
                q, k = ops.rms_norm(q, None, self.qk_norm_eps), ops.rms_norm(k, None, self.qk_norm_eps)
        elif self.temperature is not None:
            floor_scale, attn_scale = self.temperature
            pos = torch.arange(start_pos, start_pos + S, device=x.device, dtype=torch.float32)
            scale = torch.log1p(torch.floor((pos + 1.0) / floor_scale)) * attn_scale + 1.0
            q = (q * scale[None, :, None, None]).to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.kv_cache is None:
            if start_pos != 0:
                raise ValueError("start_pos > 0 needs a KV cache: call setup_caches first")
            keys, values, kv_start = k, v, 0
        else:
            keys, values, kv_start = self.kv_cache.update(start_pos, k, v)
        out = ops.attention(q, keys, values, chunk_size=self.chunk_size, kv_start=kv_start)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: the shared expert and the dense FFN layers."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """Routed expert weights in transformers' layout: gate_up_proj [E, H, 2I] (gate columns,
    then up), down_proj [E, I, H]."""

    def __init__(self, n_experts: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, hidden, 2 * inter))
        self.down_proj = nn.Parameter(torch.empty(n_experts, inter, hidden))


class MoE(nn.Module):
    """shared_expert(x) + sum over the top-k experts of expert_e(x * sigmoid(logit_e))."""

    def __init__(self, cfg: Llama4Config):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.router = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = Experts(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size)
        self.shared_expert = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, ids = ops.route(self.router(flat), self.top_k, "sigmoid")
        routed = ops.fused_moe(flat, self.experts.gate_up_proj, self.experts.down_proj, weights, ids)
        return (self.shared_expert(flat) + routed).view_as(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Llama4Config, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.feed_forward = MoE(cfg) if layer in cfg.moe_layers else MLP(cfg.hidden_size, cfg.intermediate_size_mlp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, start_pos, cos, sin):
        h = x + self.self_attn(self.input_layernorm(x), start_pos, cos, sin)
        return h + self.feed_forward(self.post_attention_layernorm(h))


class Llama4(nn.Module):
    """Llama 4 text model: tokens [B, S] int64 -> logits [B, S, vocab] in the model dtype."""

    def __init__(self, cfg: Llama4Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.max_batch_size = self.max_seq_len = 0

    # -- caches ------------------------------------------------------------------------------
    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype=None, device=None):
        """Allocate static KV caches; chunked layers hold one chunk, global layers max_seq_len."""
        dtype = dtype or self.embed_tokens.weight.dtype
        device = device or self.embed_tokens.weight.device
        cfg = self.config
        for layer in self.layers:
            attn = layer.self_attn
            length = max_seq_len if attn.chunk_size is None else min(attn.chunk_size, max_seq_len)
            attn.kv_cache = KVCache(max_batch_size, cfg.num_key_value_heads, length, cfg.head_dim, dtype, device,
                                    attn.chunk_size)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len

    def clear_caches(self):
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.max_batch_size = self.max_seq_len = 0

    # -- forward -----------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, start_pos: int = 0, *, last_only: bool = False) -> torch.Tensor:
        """tokens [B, S] at positions start_pos.. (start_pos > 0 needs setup_caches).
        last_only=True returns logits for the last position only, [B, 1, vocab]."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, S], got shape {tuple(tokens.shape)}")
        B, S = tokens.shape
        if self.max_batch_size and (B > self.max_batch_size or start_pos + S > self.max_seq_len):
            raise ValueError(f"batch {B} x positions up to {start_pos + S} exceed the caches "
                             f"({self.max_batch_size} x {self.max_seq_len}); call setup_caches again")
        pos = torch.arange(start_pos, start_pos + S, device=tokens.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        cos, sin = torch.cos(freqs)[None], torch.sin(freqs)[None]
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, start_pos, cos, sin)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (temperature=0) or sampled continuation of prompt [B, S] (or [S]).

        Returns [B, S + n] with n <= max_new_tokens (fewer once every sequence emitted eos;
        sequences that finished early are padded with eos)."""
        if prompt.dim() == 1:
            return self.generate(prompt[None], max_new_tokens, temperature=temperature, top_k=top_k,
                                 eos_token_id=eos_token_id, generator=generator)[0]
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        B, S = prompt.shape
        self.setup_caches(B, S + max_new_tokens)
        out = [prompt]
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        logits = self(prompt, 0, last_only=True)[:, -1]
        for step in range(max_new_tokens):
            token = sample(logits, temperature, top_k, generator)
            if eos_token_id is not None:
                token = torch.where(done, torch.full_like(token, eos_token_id), token)
                done |= token == eos_token_id
            out.append(token[:, None])
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            logits = self(token[:, None], S + step, last_only=True)[:, -1]
        return torch.cat(out, dim=1)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model) -> "Llama4":
        """Build from a loaded transformers Llama4ForCausalLM / Llama4TextModel /
        Llama4ForConditionalGeneration, sharing its parameters (no copy)."""
        from llama4_fast.checkpoint import language_model_parameters

        cfg = Llama4Config.from_hf(hf_model.config)
        params = language_model_parameters(hf_model)
        return _from_parameters(cfg, params, source=type(hf_model).__name__)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "Llama4":
        """Load config.json + safetensors (single file or sharded with an index) from a directory,
        also the language-model half of a multimodal checkpoint. FP8 checkpoints (fbgemm_fp8,
        compressed-tensors FP8-dynamic) load as stored: see llama4_fast.checkpoint."""
        from llama4_fast.checkpoint import load_safetensors, quantization_config, quantized_modules

        cfg = Llama4Config.from_hf(path)
        qcfg = quantization_config(path)
        params = load_safetensors(path, dtype=dtype or cfg.dtype(), device=device)
        modules = quantized_modules(params, qcfg) if qcfg is not None else {}
        return _from_parameters(cfg, params, source=str(path), modules=modules)


def _from_parameters(cfg: Llama4Config, params: dict[str, torch.Tensor], source: str,
                     modules: dict[str, nn.Module] | None = None) -> Llama4:
    """The model with `params` as its parameters; `modules` (name -> module, e.g. quantized
    experts) replace the model's own submodules first."""
    with torch.device("meta"):
        model = Llama4(cfg)
    for name, module in (modules or {}).items():
        parent, _, attr = name.rpartition(".")
        if not isinstance(getattr(model.get_submodule(parent), attr, None), nn.Module):
            raise ValueError(f"{source}: quantized weights for {name}, which the model does not have")
        setattr(model.get_submodule(parent), attr, module)
    if "lm_head.weight" not in params and cfg.tie_word_embeddings:
        params["lm_head.weight"] = params["embed_tokens.weight"]
    expected = {name for name, _ in model.named_parameters()}
    missing, unexpected = expected - params.keys(), params.keys() - expected
    if missing or unexpected:
        raise ValueError(f"weights from {source} do not match the config: missing {sorted(missing)[:8]}"
                         f"{'...' if len(missing) > 8 else ''}, unexpected {sorted(unexpected)[:8]}")
    for name, tensor in params.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False))
    ref = params["embed_tokens.weight"]
    model.inv_freq = rope_inv_freq(cfg).to(ref.device)
    return model.eval()


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token [B] from logits [B, vocab]: argmax at temperature 0, else top-k sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]

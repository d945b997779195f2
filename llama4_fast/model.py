"""A thin Llama 4 text model that calls only `llama4_fast.ops` for its hot paths.

Modules and parameter names mirror transformers' Llama4TextModel (`layers.3.self_attn.q_proj.weight`,
`layers.0.feed_forward.experts.gate_up_proj`, ...) so checkpoints load without a renaming table
and `Llama4.from_hf` can share a loaded transformers model's parameters without copying.

Shapes: B batch, S new tokens, H hidden, Hq/Hkv query/KV heads, D head dim, E experts,
I expert intermediate size. The caches are indexed by column: token s of a call at
`start_pos` sits in column start_pos + s of every sequence. Without padding a column is the
token's position; a batch of prompts of different lengths is right-aligned with left padding
`pad [B]`, and sequence b's column c sits at position c - pad[b] (negative: padding, never
attended). Each sequence keeps its own positions, RoPE angles and chunk boundaries.

Two ways to call the model: `start_pos` a Python int (prefill, any S; the caches are sliced
on the host), or a 0-d int64 tensor on the model's device (a decode step, S = 1): every shape
is then fixed and the caches' fill levels stay on the device (`kv_len` of `ops.attention`), so
the step runs without host synchronisation, and `generate` captures it once in a CUDA graph
and replays it per token.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llama4_fast import loading, ops
from llama4_fast.config import Llama4Config, rope_inv_freq

logger = logging.getLogger("llama4_fast")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


@dataclass(frozen=True)
class Positions:
    """Where the S new tokens of one forward sit; built once by `Llama4.forward`, read by every layer.

    col: cache column of the first new token: an int (prefill) or a 0-d int64 device tensor
        (a decode step, S = 1). Without padding a column is a position.
    pad, pad_list: left padding per sequence (sequence b's column c sits at position
        c - pad[b]) as a [B] int64 device tensor and as a host list (prefill only); None and
        None without padding (a decode step always carries the tensor, zeros if unpadded).
    positions: [B or 1, S] int64 absolute positions; cos, sin: [B or 1, S, D/2] float32 RoPE.

    What the layers derive from these is computed once per forward and shared (`_memo`): a
    decode step's cache slots are the same for every global layer and for every chunked one.
    """

    col: int | torch.Tensor
    pad: torch.Tensor | None
    pad_list: list[int] | None
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    _memo: dict = field(default_factory=dict, repr=False)

    def decode_slots(self, chunk_size: int | None):
        """Decode step: where the new token goes in a cache and what attention reads there.
        Global cache (chunk_size None): (column index [1], None, kv_start [B], kv_len [B]), the
        padding at negative positions. Chunked cache: (slot [B] = position % C, batch rows [B],
        kv_start [B] = each sequence's chunk start, kv_len [B] = slot + 1). int32 kv_*."""
        if chunk_size not in self._memo:
            B = self.pad.shape[0]
            if chunk_size is None:
                self._memo[None] = (self.col.view(1), None, (-self.pad).to(torch.int32),
                                    (self.col + 1).to(torch.int32).view(1).repeat(B))
            else:
                pos = self.col - self.pad
                slot = pos % chunk_size  # each sequence's own chunk, so its own slot
                self._memo[chunk_size] = (slot, torch.arange(B, device=slot.device), (pos - slot).to(torch.int32),
                                          (slot + 1).to(torch.int32))
        return self._memo[chunk_size]

    def temperature_positions(self, batch: int) -> torch.Tensor:
        """[B, S] positions for the NoPE temperature; padding (negative positions, where the
        temperature is -inf) is clamped to 0 so padded query rows stay finite."""
        if "temperature" not in self._memo:
            self._memo["temperature"] = self.positions.clamp(min=0).expand(batch, -1)
        return self._memo["temperature"]


class KVCache(nn.Module):
    """Static K/V cache of one attention layer, [B, Hkv, L, D] each.

    Global layers keep every column (L = max_seq_len, slot = column; left padding sits at
    negative positions). Chunked layers keep only each sequence's current chunk (L = chunk
    size, slot = position % C, per sequence): a query never sees an earlier chunk, so at
    decode the visible keys are exactly slots [0, position % C].
    """

    def __init__(self, batch: int, kv_heads: int, length: int, head_dim: int, dtype, device, chunk_size=None):
        super().__init__()
        shape = (batch, kv_heads, length, head_dim)
        self.chunk_size = chunk_size
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write_step(self, at: Positions, k: torch.Tensor, v: torch.Tensor):
        """Decode: store k, v [B, Hkv, 1, D] of the token at device column `at.col`; return
        (keys, values, kv_start [B], kv_len [B]) over the whole buffer: `ops.attention`
        arguments with fixed shapes, nothing read back to the host."""
        B = k.shape[0]
        kc, vc = self.k[:B], self.v[:B]
        slot, rows, kv_start, kv_len = at.decode_slots(self.chunk_size)
        if rows is None:  # global: one column for the whole batch
            kc.index_copy_(2, slot, k)
            vc.index_copy_(2, slot, v)
        else:
            kc[rows, :, slot] = k[:, :, 0]
            vc[rows, :, slot] = v[:, :, 0]
        return kc, vc, kv_start, kv_len

    def update(self, col: int, pad: list[int] | None, k: torch.Tensor, v: torch.Tensor):
        """Prefill: store k, v [B, Hkv, S, D] of cache columns col..col+S-1 (sequence b's column
        c sits at position c - pad[b]; pad None means no padding); return (keys, values,
        kv_start) covering every key those queries may attend, as `ops.attention` takes them."""
        B, S = k.shape[0], k.shape[2]
        kc, vc = self.k[:B], self.v[:B]
        C = self.chunk_size
        if C is None:
            if col + S > kc.shape[2]:
                raise ValueError(f"positions up to {col + S} exceed the cache length {kc.shape[2]}; "
                                 "call setup_caches with a larger max_seq_len")
            kc[:, :, col:col + S] = k
            vc[:, :, col:col + S] = v
            kv_start = 0 if pad is None else -torch.tensor(pad, dtype=torch.int32, device=k.device)
            return kc[:, :, :col + S], vc[:, :, :col + S], kv_start
        # Chunked: each sequence attends its cached chunk prefix (positions [chunk start, p0))
        # and the new keys. Prefixes are right-aligned before the new keys; the slots left of a
        # shorter prefix hold positions of an earlier chunk (or negative), which nobody sees.
        firsts = [col - p for p in (pad or [0] * B)]  # position of each sequence's first new token
        prefix = [p % C if p > 0 else 0 for p in firsts]
        m = max(prefix)
        if m == 0:
            keys, values = k, v
        elif pad is None:
            keys, values = torch.cat([kc[:, :, :m], k], dim=2), torch.cat([vc[:, :, :m], v], dim=2)
        else:
            keys = k.new_zeros(B, k.shape[1], m + S, k.shape[3])
            values = torch.zeros_like(keys)
            for b, n in enumerate(prefix):
                keys[b, :, m - n:m], values[b, :, m - n:m] = kc[b, :, :n], vc[b, :, :n]
            keys[:, :, m:], values[:, :, m:] = k, v
        # Keep each sequence's last chunk reached (not its padding).
        for b, p0 in enumerate(firsts if pad is not None else firsts[:1]):
            last = p0 + S - 1
            lo = max(last // C * C, p0, 0) if last >= 0 else last + 1
            rows = slice(b, b + 1) if pad is not None else slice(None)
            kc[rows, :, lo % C:lo % C + last + 1 - lo] = k[rows, :, lo - p0:]
            vc[rows, :, lo % C:lo % C + last + 1 - lo] = v[rows, :, lo - p0:]
        if pad is None:
            return keys, values, firsts[0] - m
        return keys, values, torch.tensor([p - m for p in firsts], dtype=torch.int32, device=k.device)


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

    def forward(self, x, at: Positions):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim)
        # RoPE + L2 qk-norm, or the NoPE temperature: one fused launch on the triton backend.
        if self.use_rope:
            q, k = ops.qk_prologue(q, k, cos=at.cos, sin=at.sin, qk_norm_eps=self.qk_norm_eps)
        elif self.temperature is not None:
            q, k = ops.qk_prologue(q, k, positions=at.temperature_positions(B), temperature=self.temperature)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        kv_len = None
        if isinstance(at.col, torch.Tensor):
            keys, values, kv_start, kv_len = self.kv_cache.write_step(at, k, v)
        elif self.kv_cache is None:
            if at.col != 0:
                raise ValueError("start_pos > 0 needs a KV cache: call setup_caches first")
            keys, values = k, v
            kv_start = 0 if at.pad is None else (-at.pad).to(torch.int32)
        else:
            keys, values, kv_start = self.kv_cache.update(at.col, at.pad_list, k, v)
        out = ops.attention(q, keys, values, chunk_size=self.chunk_size, kv_start=kv_start, kv_len=kv_len)
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

    def forward(self, x, at: Positions):
        h = x + self.self_attn(self.input_layernorm(x), at)
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
        self._decode_steps: dict[tuple[int, bool], DecodeStep] = {}

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
        self._decode_steps = {}  # captured graphs point into the old buffers

    def clear_caches(self):
        for layer in self.layers:
            layer.self_attn.kv_cache = None
        self.max_batch_size = self.max_seq_len = 0
        self._decode_steps = {}

    # -- forward -----------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0, *, last_only: bool = False,
                pad: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] at cache columns start_pos.. (start_pos > 0 needs setup_caches).

        start_pos may be a 0-d int64 tensor on the model's device for a decode step (S = 1,
        caches set up; it is not checked against the caches, as that would sync the host).
        pad: left padding, an int64 tensor [B]: sequence b's token at column c sits at position
        c - pad[b], and columns at negative positions are never attended (a batch of prompts
        of different lengths, right-aligned). The same pad must be passed for every call on
        the same caches. last_only=True returns logits for the last column only, [B, 1, vocab]."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an int64 [B, S] tensor of ids, got {getattr(tokens, 'dtype', tokens)} "
                             f"{tuple(getattr(tokens, 'shape', ()))}")
        # a host read: checked on CPU only (on CUDA an id past the vocabulary would fault the
        # embedding; generate checks its prompt once instead of syncing every step)
        if tokens.device.type == "cpu" and not torch.compiler.is_compiling():
            check_token_ids("tokens", tokens, self.config.vocab_size)
        B, S = tokens.shape
        decode = isinstance(start_pos, torch.Tensor)
        if decode:
            if S != 1 or start_pos.dim() != 0 or start_pos.dtype != torch.int64 or not self.max_batch_size:
                raise ValueError("a tensor start_pos is for decode steps: tokens [B, 1], a 0-d int64 "
                                 "position, caches set up")
            if B > self.max_batch_size:
                raise ValueError(f"batch {B} exceeds the caches' {self.max_batch_size}")
        elif self.max_batch_size and (B > self.max_batch_size or start_pos + S > self.max_seq_len):
            raise ValueError(f"batch {B} x positions up to {start_pos + S} exceed the caches "
                             f"({self.max_batch_size} x {self.max_seq_len}); call setup_caches again")
        if pad is not None:
            if pad.shape != (B,) or pad.dtype != torch.int64 or pad.device != tokens.device:
                raise ValueError(f"pad must be an int64 tensor [B={B}] on {tokens.device}, got "
                                 f"{pad.dtype} {tuple(pad.shape)} on {pad.device}")
            # a host read: checked on CPU only, like the kernels' id checks (no sync per CUDA step)
            if pad.device.type == "cpu" and not torch.compiler.is_compiling() and bool((pad < 0).any()):
                raise ValueError(f"pad counts leading padding tokens and must be >= 0, got {pad.tolist()}")
        elif decode:
            pad = torch.zeros(B, dtype=torch.int64, device=tokens.device)
        positions = (torch.arange(S, device=tokens.device) + start_pos)[None]
        if pad is not None:
            positions = positions - pad[:, None]
        freqs = positions.float()[..., None] * self.inv_freq
        at = Positions(start_pos, pad, None if pad is None or decode else pad.tolist(), positions,
                       torch.cos(freqs), torch.sin(freqs))
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, at)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, start_pos: int = 0, *, piece: int | None = None,
                pad: torch.Tensor | None = None) -> torch.Tensor:
        """Run a prompt [B, S] through the caches in pieces of at most `piece` tokens (default:
        the attention chunk, 8192 for Llama 4), so activations stay bounded on long prompts;
        returns the last column's logits [B, vocab]. pad: left padding, as in `forward`."""
        _positive_int("piece", piece, allow_none=True)
        piece = piece if piece is not None else self.config.attention_chunk_size or 8192
        S = tokens.shape[1]
        if S == 0:
            raise ValueError("tokens must hold at least one position to prefill, got [B, 0]")
        for s0 in range(0, S, piece):
            logits = self(tokens[:, s0:s0 + piece], start_pos + s0, last_only=True, pad=pad)
        return logits[:, -1]

    def decode_step(self, batch_size: int, cuda_graph: bool | None = None) -> "DecodeStep":
        """The decode step for `batch_size` sequences over the current caches: call it with the
        tokens [B] and their cache column (int), and the left padding [B] if the prompts were
        padded, to get the next logits [B, vocab]. On CUDA it is
        captured in a CUDA graph on first use (cuda_graph=None means "when on CUDA") and reused
        until the caches are set up again."""
        use_graph = self.embed_tokens.weight.is_cuda if cuda_graph is None else cuda_graph
        key = (batch_size, use_graph)
        if key not in self._decode_steps:
            self._decode_steps[key] = DecodeStep(self, batch_size, use_graph)
        return self._decode_steps[key]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor | list[torch.Tensor], max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: int | None = None, eos_token_id: int | list[int] | None = None,
                 generator: torch.Generator | None = None, prefill_piece: int | None = None,
                 cuda_graph: bool | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Greedy (temperature=0) or sampled continuation of prompt [B, S] (or [S]), or of a
        list of 1-D prompts of different lengths, decoded as one left-padded batch.

        The prompt is prefilled in pieces (see `prefill`); each new token is one `decode_step`
        (a CUDA-graph replay on the GPU). Tokens stay on the device: the host reads nothing
        back per token, only every 16 tokens whether every sequence has emitted eos.
        Caches are reused when large enough for B x (S + max_new_tokens).

        eos_token_id: one id or several (Llama 4's configs list three): a sequence ends at any.
        Returns, for a tensor prompt, [B, S + n] with n <= max_new_tokens (fewer once every
        sequence emitted eos; sequences that finished earlier are padded with the first eos id),
        or [S + n] for a 1-D prompt; for a list, a list of 1-D tensors, each its prompt and its
        new tokens up to and including its own eos: the same as decoding it alone.
        Every argument is checked first (`check_generate_args`), token ids included."""
        check_generate_args(self.config.vocab_size, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                            eos_token_id=eos_token_id, generator=generator, prefill_piece=prefill_piece,
                            cuda_graph=cuda_graph)
        options = dict(temperature=temperature, top_k=top_k, eos_token_id=eos_token_id, generator=generator,
                       prefill_piece=prefill_piece, cuda_graph=cuda_graph)
        if isinstance(prompt, (list, tuple)):
            return self._generate_padded(list(prompt), max_new_tokens, **options)
        if prompt.dim() == 1:
            return self._generate(prompt[None], max_new_tokens, None, **options)[0]
        return self._generate(prompt, max_new_tokens, None, **options)

    def _generate_padded(self, prompts: list[torch.Tensor], max_new_tokens: int, **options) -> list[torch.Tensor]:
        lengths = [p.numel() for p in prompts]
        S = max(lengths)
        batch = prompts[0].new_zeros(len(prompts), S)  # token 0 in the padding; never attended
        for b, p in enumerate(prompts):
            batch[b, S - lengths[b]:] = p
        pad = torch.tensor([S - n for n in lengths], dtype=torch.int64, device=batch.device)
        out = self._generate(batch, max_new_tokens, pad, **options)
        ends = [out.shape[1]] * len(prompts)
        eos = options["eos_token_id"]
        if eos is not None:  # each sequence ends at its own first eos, not the batch's last
            hits = torch.isin(out[:, S:], torch.tensor(eos, device=out.device).reshape(-1))
            ends = [S + int(h.int().argmax()) + 1 if bool(h.any()) else out.shape[1] for h in hits]
        return [row[S - n:end] for row, n, end in zip(out, lengths, ends)]

    def _generate(self, prompt: torch.Tensor, max_new_tokens: int, pad: torch.Tensor | None, *,
                  temperature: float, top_k: int | None, eos_token_id: int | list[int] | None,
                  generator: torch.Generator | None, prefill_piece: int | None,
                  cuda_graph: bool | None) -> torch.Tensor:
        eos = None
        if eos_token_id is not None:
            eos = torch.tensor(eos_token_id, dtype=prompt.dtype, device=prompt.device).reshape(-1)
        B, S = prompt.shape
        if self.max_batch_size < B or self.max_seq_len < S + max_new_tokens:
            self.setup_caches(B, S + max_new_tokens)
        logits = self.prefill(prompt, piece=prefill_piece, pad=pad)
        step = self.decode_step(B, cuda_graph)
        new = torch.empty(B, max_new_tokens, dtype=prompt.dtype, device=prompt.device)
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        n = max_new_tokens
        for i in range(max_new_tokens):
            token = sample(logits, temperature, top_k, generator)
            if eos is not None:
                token = torch.where(done, eos[0], token)
                done |= torch.isin(token, eos)
            new[:, i] = token
            if i + 1 == max_new_tokens:
                break
            if eos is not None and (i + 1) % 16 == 0 and bool(done.all()):
                n = i + 1
                break
            logits = step(token, S + i, pad)
        if eos is not None:  # cut after the step at which the last sequence finished
            finished = torch.isin(new[:, :n], eos).int().cummax(dim=1).values.all(dim=0)
            if bool(finished.any()):
                n = int(finished.int().argmax()) + 1
        return torch.cat([prompt, new[:, :n]], dim=1)

    # -- construction (llama4_fast.loading) ---------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model) -> "Llama4":
        """Build from a loaded transformers Llama4ForCausalLM / Llama4ForConditionalGeneration
        (or a Llama4TextModel whose config ties the embeddings), sharing its parameters (no copy)."""
        return loading.from_hf_model(cls, hf_model)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | str | None = None,
                        device: str | torch.device = "cpu", quantize: str | None = None,
                        group_size: int = 128) -> "Llama4":
        """Load config.json + safetensors (model.safetensors, or the shards an index names) from a
        directory, also the language-model half of a multimodal checkpoint; dtype defaults to
        config.json's. FP8 checkpoints (fbgemm_fp8, compressed-tensors FP8-dynamic) load as
        stored. `quantize` ("int4", "fp8", ...: llama4_fast.quant.SCHEMES; group_size for INT4)
        quantizes the routed experts on `device` while they stream in: the full-precision model
        is never held anywhere. Everything is checked against the config before any weight is
        read: see llama4_fast.loading."""
        return loading.load_pretrained(cls, path, dtype=dtype, device=device, quantize=quantize,
                                       group_size=group_size)


class DecodeStep:
    """One decode step of `model` for a fixed batch: (tokens [B], cache column int, left
    padding [B] or None) -> logits [B, vocab], the logits buffer being reused by the next call.

    Inputs live in static device buffers and the position is a 0-d tensor, so the forward has
    fixed shapes and no host synchronisation. With `cuda_graph`, the first call warms the step
    up on a side stream (compiling the Triton kernels; it writes the KV slot of the position
    the real step rewrites) and captures it; every call then copies the inputs and replays.
    """

    def __init__(self, model: Llama4, batch_size: int, cuda_graph: bool):
        device = model.embed_tokens.weight.device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
        self.model, self.cuda_graph = model, cuda_graph
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def _run(self) -> torch.Tensor:
        return self.model(self.tokens, self.pos, last_only=True, pad=self.pad)[:, -1]

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, pos: int, pad: torch.Tensor | None = None) -> torch.Tensor:
        if pos >= self.model.max_seq_len:
            raise ValueError(f"position {pos} is past the caches' {self.model.max_seq_len} positions")
        self.tokens.copy_(tokens.view(-1, 1))
        self.pos.fill_(pos)
        if pad is None:
            self.pad.zero_()
        else:
            self.pad.copy_(pad)
        if not self.cuda_graph:
            return self._run()
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.logits = self._run()
            except RuntimeError as e:  # e.g. a backend that synchronises: decode eagerly, loudly
                logger.warning("llama4_fast: CUDA-graph capture of the decode step failed (%s); "
                               "decoding without the graph", e)
                self.cuda_graph = False
                return self._run()
            self.graph = graph
        self.graph.replay()
        return self.logits


def _positive_int(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be {'None or ' if allow_none else ''}>= 1, got {value}")


def check_token_ids(name: str, tokens: torch.Tensor, vocab_size: int):
    """tokens: an integer tensor of ids in [0, vocab_size) (its range read on the host)."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold int64 (or int32) token ids, got {tokens.dtype}")
    if tokens.numel() and not bool(((tokens >= 0) & (tokens < vocab_size)).all()):
        raise ValueError(f"{name} holds token ids outside the vocabulary [0, {vocab_size}): "
                         f"min {int(tokens.min())}, max {int(tokens.max())}")


def check_generate_args(vocab_size: int, prompt, max_new_tokens, *, temperature=0.0, top_k=None, eos_token_id=None,
                        generator=None, prefill_piece=None, cuda_graph=None):
    """Every argument of `Llama4.generate`, checked before any work: a ValueError/TypeError
    naming the argument, never a late crash."""
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError("prompt is an empty list: give at least one prompt")
        for i, p in enumerate(prompt):
            check_token_ids(f"prompt[{i}]", p, vocab_size)
            if p.dim() != 1 or p.numel() == 0:
                raise ValueError(f"prompt[{i}] must be a non-empty 1-D tensor of ids, got shape {tuple(p.shape)}")
            if p.device != prompt[0].device:
                raise ValueError(f"prompt[{i}] is on {p.device} but prompt[0] on {prompt[0].device}")
    else:
        check_token_ids("prompt", prompt, vocab_size)
        if prompt.dim() not in (1, 2) or 0 in prompt.shape:
            raise ValueError(f"prompt must be a non-empty [S] or [B, S] tensor of ids, got shape {tuple(prompt.shape)}")
    _positive_int("max_new_tokens", max_new_tokens)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    _positive_int("top_k", top_k, allow_none=True)
    _positive_int("prefill_piece", prefill_piece, allow_none=True)
    if eos_token_id is not None:
        ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
        if not ids or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size for i in ids):
            raise ValueError(f"eos_token_id must be an id or a non-empty list of ids in [0, {vocab_size}), "
                             f"got {eos_token_id!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if cuda_graph not in (None, True, False):
        raise TypeError(f"cuda_graph must be None, True or False, got {cuda_graph!r}")


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

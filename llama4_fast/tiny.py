"""A built-in tiny Llama 4 with random weights: for the demo and the tests, no download.

It keeps every structural feature of the real models at toy width: 16 experts (top-1) with a
shared expert, GQA (8 query / 2 KV heads), RoPE layers with L2 qk-norm and chunked attention
(chunk 32, so short prompts cross chunk boundaries), a global NoPE layer every 4th layer with
temperature tuning active from position 15, and Llama 3-style RoPE scaling as in Scout.
"""

from __future__ import annotations

import torch

TINY_TEXT_CONFIG = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    intermediate_size_mlp=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    num_local_experts=16,
    num_experts_per_tok=1,
    attention_chunk_size=32,
    floor_scale=16,
    attn_scale=0.1,
    use_qk_norm=True,
    rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 16.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 1024},
    max_position_embeddings=4096,
    initializer_range=0.05,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_hf_model(seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu", **overrides):
    """A transformers Llama4ForCausalLM with the tiny config (overrides replace entries) and
    random weights drawn from `seed`."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = dict(TINY_TEXT_CONFIG, **overrides)
    torch.manual_seed(seed)
    config = Llama4TextConfig(**cfg)
    config._attn_implementation = "sdpa"
    model = Llama4ForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: always generate the full length
    model.generation_config.pad_token_id = cfg["pad_token_id"]
    return model

"""Every kernel launcher refuses tensors it cannot run on, with an error naming the argument,
instead of Triton's own failure or a silent wrong answer."""

import pytest
import torch

from llama4_fast.kernels import chunked_attention, fused_moe, qk_prologue, quant_matmul, route

X, W = torch.randn(2, 32), torch.randn(4, 32, 32)
ONE_EXPERT = (torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int32))
Q = torch.randn(1, 2, 4, 16)


def test_cpu_tensors_without_the_interpreter(monkeypatch):
    """CPU tensors are only valid under TRITON_INTERPRET=1 (Triton would say "0 active drivers")."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = [
        ("router_logits", lambda: route(torch.randn(2, 4), 1)),
        ("hidden_states", lambda: fused_moe(X, W, W[:, :16], *ONE_EXPERT)),
        ("x", lambda: quant_matmul(X, W[0].to(torch.float8_e4m3fn), torch.ones(32), weight_format="fp8_rowwise")),
        ("q", lambda: chunked_attention(Q, Q, Q)),
        ("q", lambda: qk_prologue(Q, Q, qk_norm_eps=1e-6)),
    ]
    for name, call in calls:
        with pytest.raises(ValueError, match=f"{name} is on cpu"):
            call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only restriction")
def test_bf16_is_refused_where_the_interpreter_gets_it_wrong():
    """The interpreter's bf16 tl.dot multiplies raw bits (triton issue 11584); attention's own
    tests cover chunked_attention."""
    x, w = X.bfloat16(), W.bfloat16()
    with pytest.raises(TypeError, match="bfloat16"):
        fused_moe(x, w, w[:, :16], *ONE_EXPERT)
    with pytest.raises(TypeError, match="bfloat16"):
        quant_matmul(x, torch.zeros(16, 32, dtype=torch.uint8), torch.ones(1, 32), weight_format="int4", group_size=32)

"""Training through the transformers patch and the thin model: the gradient of every parameter
equals the unpatched model's (torch backend, and the Triton kernels through the interpreter on
CPU), with gradient checkpointing, an auxiliary loss on the returned router logits, a peft
LoRA fine-tune and bf16 autocast."""

import copy

import pytest
import torch
from test_triton_backend import NARROW

import llama4_fast
from llama4_fast import Llama4, ops, registry
from llama4_fast.tiny import tiny_hf_model

pytest.importorskip("transformers")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAD_TOL = 1e-4  # fp32, relative norm per parameter (the bound)


def batch(B=2, S=19, pad=6, vocab=1024, seed=0):
    """Token ids, a mask with left padding on the last row, labels ignoring the padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, S), generator=gen).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[-1, :pad] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def grads(model, data, aux_loss_coef=0.0, **kwargs):
    """(loss, {parameter name: gradient}) of one forward + backward in train mode. With
    aux_loss_coef, the loss adds the Switch-Transformer load-balancing loss over the router
    logits the model returns (transformers' Llama 4 leaves that loss to the trainer)."""
    ids, mask, labels = data
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=labels, use_cache=False, output_router_logits=aux_loss_coef > 0,
                **kwargs)
    loss = out.loss
    if aux_loss_coef:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        cfg = model.config
        loss = loss + aux_loss_coef * load_balancing_loss_func(out.router_logits, cfg.num_local_experts,
                                                               cfg.num_experts_per_tok, mask)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict, ref: dict, tol=GRAD_TOL):
    assert got.keys() == ref.keys(), set(got) ^ set(ref)
    worst = {}
    for name, r in ref.items():
        g = got[name]
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient"
        worst[name] = ((g.double() - r.double()).norm() / r.double().norm().clamp_min(1e-30)).item()
    bad = {n: e for n, e in worst.items() if not e < tol}
    assert not bad, f"gradients differ (relative): {bad}"


def test_patched_gradients_equal_unpatched_torch_backend():
    """Every parameter (experts, router, shared expert, attention, norms, embeddings), top-2
    routing with an auxiliary loss on the returned router logits, left padding, chunked and
    NoPE layers."""
    ref_model = tiny_hf_model(seed=31, device=DEVICE, num_experts_per_tok=2)
    data = batch()
    loss0, ref = grads(ref_model, data, aux_loss_coef=0.1)
    patched = llama4_fast.patch(copy.deepcopy(ref_model))
    with registry.use("torch"), registry.record() as calls:
        loss1, got = grads(patched, data, aux_loss_coef=0.1)
    assert calls[("fused_moe", "torch")] and calls[("attention", "torch")]
    assert torch.allclose(loss1, loss0, rtol=1e-5)
    assert_same_grads(got, ref)


def test_patched_gradients_equal_unpatched_triton_kernels():
    """The same through the Triton kernels (interpreted on CPU): every op on the triton backend,
    forward and backward."""
    ref_model = tiny_hf_model(seed=32, device=DEVICE, **NARROW)
    data = batch(S=21)
    _, ref = grads(ref_model, data)
    patched = llama4_fast.patch(copy.deepcopy(ref_model))
    with registry.record() as calls:
        _, got = grads(patched, data)
    for op in ("route", "fused_moe", "attention", "qk_prologue"):
        assert calls[(op, "triton")] > 0, f"{op} did not run on the triton backend: {dict(calls)}"
    assert_same_grads(got, ref)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = llama4_fast.patch(tiny_hf_model(seed=33, device=DEVICE, **NARROW))
    data = batch()
    with registry.use("torch"):
        _, ref = grads(model, data)
        model.gradient_checkpointing_enable()
        _, got = grads(model, data)
    assert model.is_gradient_checkpointing
    assert_same_grads(got, ref, tol=1e-6)


def test_lora_finetune_losses_match_unpatched():
    """20 AdamW steps of peft LoRA adapters on the attention projections and the shared
    expert (the frozen experts still pass the gradient to the activations)."""
    peft = pytest.importorskip("peft")
    base = tiny_hf_model(seed=34, device=DEVICE, **NARROW)
    data = batch(S=16)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def finetune(model):
        torch.manual_seed(0)  # LoRA's A matrices are initialised at random
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        trained = [p for p in model.parameters() if p.requires_grad]
        assert trained and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
        opt = torch.optim.AdamW(trained, lr=1e-2)
        losses = []
        for _ in range(20):
            loss, _ = grads(model, data)
            opt.step()
            losses.append(loss.item())
        return losses

    ref = finetune(copy.deepcopy(base))
    with registry.use("torch"):
        got = finetune(llama4_fast.patch(copy.deepcopy(base)))
    assert ref[-1] < ref[0] * 0.9, f"the fine-tune does not learn: {ref}"
    assert max(abs(a - b) / abs(b) for a, b in zip(got, ref)) < 1e-4, (got, ref)


def test_bf16_autocast_training(monkeypatch):
    """Under torch.autocast the patched experts run in the autocast dtype, as the unpatched bmm
    does, and the fp32 weights get fp32 gradients close to the unpatched model's."""
    ref_model = tiny_hf_model(seed=35, device=DEVICE)
    data = batch()
    seen, fused_moe = [], ops.fused_moe
    monkeypatch.setattr(ops, "fused_moe", lambda x, w13, w2, *a, **kw: seen.append((x.dtype, w13.dtype, w2.dtype))
                        or fused_moe(x, w13, w2, *a, **kw))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss0, ref = grads(ref_model, data)
        patched = llama4_fast.patch(copy.deepcopy(ref_model))
        with registry.use("torch"), registry.record() as calls:
            loss1, got = grads(patched, data)
    assert calls[("fused_moe", "torch")] > 0 and set(seen) == {(torch.bfloat16,) * 3}
    assert all(g.dtype == torch.float32 for g in got.values())
    assert abs(loss1.item() - loss0.item()) < 2e-2 * abs(loss0.item())
    assert_same_grads(got, ref, tol=5e-2)


def test_thin_model_trains_on_the_triton_kernels():
    """The thin model's parameters get the gradients of the torch backend's run, through the
    Triton kernels (forward and backward)."""
    thin = Llama4.from_hf(tiny_hf_model(seed=36, device=DEVICE, **NARROW))
    tokens = batch(S=21)[0]

    def thin_grads(backend=None):
        thin.zero_grad(set_to_none=True)
        ctx = registry.use(backend) if backend else registry.record()
        with ctx:
            logits = thin(tokens)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
        return {n: p.grad.detach().clone() for n, p in thin.named_parameters() if p.grad is not None}

    ref = thin_grads("torch")
    got = thin_grads()
    assert len(ref) == len(list(thin.parameters()))
    assert_same_grads(got, ref)


def test_qlora_on_quantized_experts():
    """QLoRA: INT4 experts (frozen) under LoRA adapters on the attention projections. The
    adapters' gradients flow back through the quantized experts' backward; they equal those of
    the same model with the experts dequantized to dense weights, through the Triton kernels."""
    peft = pytest.importorskip("peft")
    from llama4_fast.quant_model import quantize

    base = tiny_hf_model(seed=37, device=DEVICE, **dict(NARROW, intermediate_size=64))  # K % 32 == 0
    quantized = quantize(llama4_fast.patch(copy.deepcopy(base)), "int4", group_size=32)
    dense = copy.deepcopy(base)  # the same experts, dequantized: what the INT4 model computes
    layers = 0
    for layer_q, layer_d in zip(quantized.model.layers, dense.model.layers):
        experts = getattr(layer_q.feed_forward, "experts", None)
        if experts is not None:
            layers += 1
            for name in ("gate_up_proj", "down_proj"):  # the format objects the kernels read
                getattr(layer_d.feed_forward.experts, name).data.copy_(getattr(experts, name).dequantize())
    assert layers
    dense = llama4_fast.patch(dense)
    data = batch(S=16)
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])

    def adapter_grads(model):
        torch.manual_seed(0)
        model = peft.get_peft_model(model, peft.LoraConfig(**lora))
        _, g = grads(model, data)
        assert g and all("lora_" in n for n in g)
        return {n.replace("base_model.model.", ""): v for n, v in g.items()}

    with registry.record() as calls:
        got = adapter_grads(quantized)
    assert calls[("fused_moe", "triton")] > 0
    assert_same_grads(got, adapter_grads(dense), tol=1e-4)

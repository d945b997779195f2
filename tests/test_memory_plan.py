"""llama4_fast.memory_plan and `llama4-fast plan`: the numbers against hand arithmetic from the
published shapes (written out here, not taken from the module), against docs/scaling.md, and
against the bytes the thin model really allocates (tiny config, CPU)."""

import json
import subprocess
import sys

import pytest
import torch

from llama4_fast import Llama4, Llama4Config, cli, quantize
from llama4_fast.planning import GIB, PRESETS, memory_plan
from llama4_fast.tiny import TINY_TEXT_CONFIG

GB = 1e9
WEIGHT_PARTS = ("attention", "routed_experts", "shared_experts_routers", "dense_ffn", "embeddings", "lm_head",
                "norms")


def parts(plan):
    return {k: getattr(plan, k) for k in WEIGHT_PARTS}


# -- published shapes, by hand -------------------------------------------------------------------
# hidden 5120, 48 layers, 40 query / 8 KV heads of 128, experts and shared expert 8192 wide,
# dense FFN 16384, vocab 202048; Scout 16 experts on every layer, Maverick 128 on the 24 odd layers
# and a dense FFN on the 24 even ones. bf16 = 2 bytes.
ATTN_PARAMS = 5120 * 40 * 128 * 2 + 5120 * 8 * 128 * 2  # q and o, k and v
EXPERT_PARAMS = 3 * 5120 * 8192  # gate, up, down of one expert (and of the shared expert)
DENSE_PARAMS = 3 * 5120 * 16384
VOCAB_PARAMS = 202048 * 5120
NORM_PARAMS = (2 * 48 + 1) * 5120


def test_scout_bf16_weights_by_hand():
    plan = memory_plan("scout", "bf16")
    assert parts(plan) == dict(attention=48 * ATTN_PARAMS * 2, routed_experts=48 * 16 * EXPERT_PARAMS * 2,
                               shared_experts_routers=48 * (EXPERT_PARAMS + 5120 * 16) * 2, dense_ffn=0,
                               embeddings=VOCAB_PARAMS * 2, lm_head=VOCAB_PARAMS * 2, norms=NORM_PARAMS * 2)
    assert round(plan.weight_bytes / 2 / 1e9, 1) == 107.8  # the language model (109B with the vision tower)


def test_scout_int4_experts_by_hand():
    """INT4 group 128: half a byte per weight plus a bf16 scale per 128 rows of K and column."""
    plan = memory_plan("scout", "int4", group_size=128)
    per_expert = EXPERT_PARAMS // 2 + EXPERT_PARAMS // 128 * 2
    assert plan.routed_experts == 48 * 16 * per_expert
    assert plan.attention == 48 * ATTN_PARAMS * 2  # only the routed experts by default, as quantize
    both = memory_plan("scout", "int4_asym", group_size=64, shared_expert=True, attention=True)
    per_expert = EXPERT_PARAMS // 2 + EXPERT_PARAMS // 64 * (2 + 1)  # + a uint8 zero point per group
    assert both.routed_experts == 48 * 16 * per_expert
    assert both.shared_experts_routers == 48 * (per_expert + 5120 * 16 * 2)
    assert both.attention == 48 * (ATTN_PARAMS // 2 + ATTN_PARAMS // 64 * 3)


def test_maverick_fp8_weights_by_hand():
    """FP8 per channel: a byte per weight plus a float32 scale per output column; 8 GPUs of
    expert parallelism keep 16 of the 128 experts each."""
    plan = memory_plan("maverick", "fp8", gpus=8)
    gate_up = 5120 * 16384 + 4 * 16384
    down = 8192 * 5120 + 4 * 5120
    assert plan.routed_experts == 24 * 16 * (gate_up + down)
    assert plan.dense_ffn == 24 * DENSE_PARAMS * 2
    assert plan.shared_experts_routers == 24 * (EXPERT_PARAMS + 5120 * 128) * 2
    assert plan.experts_per_gpu == 16
    one_gpu = memory_plan("maverick", "fp8")
    assert one_gpu.routed_experts == 8 * plan.routed_experts
    assert {k: v for k, v in parts(one_gpu).items() if k != "routed_experts"} == \
        {k: v for k, v in parts(plan).items() if k != "routed_experts"}  # the rest replicated
    tensor = memory_plan("maverick", "fp8_tensor", dense_ffn=True)
    assert tensor.dense_ffn == 24 * (DENSE_PARAMS + 3 * 4)
    block = memory_plan("maverick", "fp8_block")
    assert block.routed_experts == 24 * 128 * (5120 * 16384 + 4 * 40 * 128 + 8192 * 5120 + 4 * 64 * 40)


@pytest.mark.parametrize("context, gb", [(8192, 1.61), (32768, 2.82), (131072, 7.65)])
def test_kv_per_sequence_is_docs_scaling(context, gb):
    """docs/scaling.md: KV(S) = 4096 B x (12 S + 36 min(S, 8192)); the same for both models."""
    for model in ("scout", "maverick"):
        plan = memory_plan(model, "bf16", context=context)
        assert plan.kv_cache == 4096 * (12 * context + 36 * min(context, 8192))
        assert round(plan.kv_cache / GB, 2) == gb
    assert memory_plan("scout", batch=3, context=context).kv_cache == 3 * plan.kv_cache


def test_maverick_size_table_is_docs_scaling():
    plan = memory_plan("maverick", "bf16")
    billions = {k: round(v / 2 / GB, 2) for k, v in parts(plan).items()}
    assert billions == dict(attention=3.02, routed_experts=386.55, shared_experts_routers=3.04, dense_ffn=6.04,
                            embeddings=1.03, lm_head=1.03, norms=0.0)
    assert round((plan.embeddings + plan.lm_head) / 2 / GB, 2) == 2.07
    assert round(plan.weight_bytes / 2 / GB, 1) == 400.7


@pytest.mark.parametrize("gpus, table", [(8, {"bf16": 125.0, "fp8": 64.6, "int4": 35.3}),
                                         (16, {"bf16": 76.6, "fp8": 40.4, "int4": 22.8})])
def test_ep_weights_per_gpu_are_docs_scaling(gpus, table):
    """docs/scaling.md's EP+DP column quantizes every matrix but the embeddings, the routers too,
    which quantize leaves in bf16 (+16 MB in INT4: 22.86 GB against the page's 22.83, shown 22.8),
    and leaves out the norms (1 MB) and the FP8 scales (at most 35 MB per GPU)."""
    for scheme, gb in table.items():
        opts = {} if scheme == "bf16" else dict(shared_expert=True, dense_ffn=True, attention=True)
        plan = memory_plan("maverick", scheme, gpus=gpus, **opts)
        assert plan.weight_bytes / GB == pytest.approx(gb, abs=0.06), scheme  # one decimal, plus those


# -- the thin model's real allocations -------------------------------------------------------------

def _tiny_cfg(**overrides):
    return Llama4Config.from_hf(dict(TINY_TEXT_CONFIG, interleave_moe_layer_step=2, **overrides))


@pytest.mark.parametrize("context", [1, 31, 32, 33, 100])
def test_kv_cache_is_what_setup_caches_allocates(context):
    cfg = _tiny_cfg()
    with torch.device("meta"):
        model = Llama4(cfg)
    model.setup_caches(3, context, dtype=torch.bfloat16, device="cpu")
    allocated = sum(b.nbytes for layer in model.layers for b in layer.self_attn.kv_cache.buffers())
    assert memory_plan(cfg, batch=3, context=context, dtype="bfloat16").kv_cache == allocated


@pytest.mark.parametrize("scheme, options", [
    ("bf16", {}),
    ("fp8", {}),
    ("fp8", dict(shared_expert=True, dense_ffn=True, attention=True)),
    ("fp8_tensor", dict(dense_ffn=True)),
    ("fp8_block", dict(attention=True)),
    ("int4", dict(shared_expert=True)),
    ("int4_asym", dict(dense_ffn=True, attention=True)),
])
def test_weights_are_what_quantize_leaves(scheme, options):
    """Every part's bytes equal the tensors `quantize` leaves in a thin model (bf16, group 32)."""
    cfg = _tiny_cfg()
    torch.manual_seed(0)
    model = Llama4(cfg).to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    if scheme != "bf16":
        quantize(model, scheme, group_size=32, **options)
    state = model.state_dict()

    def size(pred):
        return sum(t.nbytes for k, t in state.items() if pred(k))

    expected = dict(
        attention=size(lambda k: ".self_attn." in k),
        routed_experts=size(lambda k: ".experts." in k),
        shared_experts_routers=size(lambda k: ".shared_expert." in k or k.endswith(".router.weight")),
        dense_ffn=size(lambda k: ".feed_forward." in k and not any(s in k for s in ("expert", "router"))),
        embeddings=size(lambda k: k.startswith("embed_tokens.")),
        lm_head=size(lambda k: k.startswith("lm_head.")),
        norms=size(lambda k: "norm" in k),
    )
    assert sum(expected.values()) == size(lambda k: True)
    plan = memory_plan(cfg, scheme, group_size=32, dtype="bfloat16", **options)
    assert parts(plan) == expected


# -- directory configs, max_context ------------------------------------------------------------------

def test_a_directory_gives_the_preset_numbers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": PRESETS["maverick"]}))
    from_dir = memory_plan(tmp_path, "int4", context=32768, gpus=4)
    preset = memory_plan("maverick", "int4", context=32768, gpus=4)
    assert from_dir.model == str(tmp_path)
    assert {**vars(from_dir), "model": "maverick"} == vars(preset)


def test_a_tiny_directory_is_the_tiny_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_TEXT_CONFIG))
    cfg = Llama4Config.from_hf(dict(TINY_TEXT_CONFIG))
    for scheme in ("bf16", "fp8", "int4"):
        a = memory_plan(tmp_path, scheme, group_size=32, batch=2, context=77)
        b = memory_plan(cfg, scheme, group_size=32, batch=2, context=77)
        assert {**vars(a), "model": "config"} == vars(b)
    assert a.n_moe_layers == 4 and a.dense_ffn == 0  # every layer MoE, as the tiny config says


@pytest.mark.parametrize("model, weights, kwargs", [
    ("scout", "int4", dict(batch=1)),
    ("scout", "fp8", dict(batch=4, gpu_gib=141)),
    ("maverick", "fp8", dict(batch=2, gpus=8)),
    ("maverick", "int4", dict(batch=1, gpus=16, piece=1000)),
])
def test_max_context_is_the_largest_that_fits(model, weights, kwargs):
    plan = memory_plan(model, weights, context=4096, **kwargs)
    n = plan.max_context
    assert 0 < n < plan.context_limit
    assert memory_plan(model, weights, context=n, **kwargs).fits
    assert not memory_plan(model, weights, context=n + 1, **kwargs).fits
    assert plan.fits == (plan.context <= n)


def test_max_context_limits():
    nothing = memory_plan("maverick", "bf16")  # 801 GB of weights on one 80 GiB GPU
    assert not nothing.fits and nothing.max_context == 0 and "no context fits" in nothing.verdict()
    capped = memory_plan(_tiny_cfg(), "bf16", gpu_gib=80)  # no limit but the config's
    assert capped.max_context == capped.context_limit == 4096 and "more would fit" in capped.verdict()


def test_bad_arguments_name_themselves():
    for kwargs, name in [(dict(weights="int3"), "weights"), (dict(batch=0), "batch"), (dict(context=-1), "context"),
                         (dict(gpus=3), "gpus"), (dict(gpu_gib=0), "gpu_gib"),
                         (dict(weights="int4", group_size=48), "group_size"),
                         (dict(weights="int4", group_size=8192, shared_expert=True), "group_size"),
                         (dict(attention=True), "attention"), (dict(dtype="float8"), "dtype")]:
        with pytest.raises(ValueError, match=f"^{name}: "):
            memory_plan("scout", **kwargs)
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        memory_plan("scot")


# -- command line ------------------------------------------------------------------------------------

def test_cli_prints_the_table(capsys):
    assert cli.main(["plan", "scout", "--weights", "int4", "--context", "32768"]) == 0
    out = capsys.readouterr().out
    assert "| routed experts (48 MoE layers x 16 experts, int4 g128) |" in out
    assert "| **total per GPU** |" in out and "fits: " in out and "largest context at batch 1" in out


def test_cli_maverick_on_8_gpus(capsys):
    assert cli.main(["plan", "maverick", "--weights", "fp8", "--gpus", "8", "--shared-expert", "--dense-ffn",
                     "--attention"]) == 0
    out = capsys.readouterr().out
    assert "expert parallel over 8 GPUs" in out and "16 of 128 experts" in out
    plan = memory_plan("maverick", "fp8", gpus=8, shared_expert=True, dense_ffn=True, attention=True)
    assert f"| **weights** | {plan.weight_bytes / GIB:,.2f} |" in out


@pytest.mark.parametrize("argv, what", [
    (["plan", "MISSING"], "MODEL: MISSING: neither a preset"),
    (["plan", "scout", "--weights", "int3"], "argument --weights: invalid choice"),
    (["plan", "scout", "--gpus", "3"], "--gpus: 3 GPUs do not divide num_local_experts=16"),
    (["plan", "scout", "--batch", "0"], "argument --batch: must be > 0"),
    (["plan", "scout", "--weights", "int4", "--group-size", "48"], "--group-size: must be a power of two"),
])
def test_cli_bad_arguments(capsys, argv, what):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and what in err and "Traceback" not in err


def test_cli_directory_without_config(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "config.json: no such file" in err


def test_cli_plan_help():
    out = subprocess.run([sys.executable, "-m", "llama4_fast.cli", "plan", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--gpu-gib" in out.stdout and "scout, maverick" in out.stdout

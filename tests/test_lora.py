"""LoRA: targets per family, exact zero start (B = 0), adapter-only training with bit-identical base
weights, dropout only with an rng, merge equal to the adapter model, HF export that transformers
loads, sharded placement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors import safe_open

from plad_jax import methods
from plad_jax import sharding as shd
from plad_jax.data import SequenceBatch
from plad_jax.models import LanguageModel, from_pretrained, lora
from plad_jax.training.step import (
    OptimizerConfig,
    TrainState,
    make_optimizer,
    make_train_step,
    reduce_metrics,
)
from tests.helpers import max_abs_diff_real, padded_batch, reference_logits

VOCAB = 64
FAMILIES = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    ),
    "t5": (
        transformers.T5Config,
        transformers.T5ForConditionalGeneration,
        dict(
            d_model=32,
            d_kv=8,
            d_ff=48,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
        ),
    ),
    "gpt_neo": (
        transformers.GPTNeoConfig,
        transformers.GPTNeoForCausalLM,
        dict(
            hidden_size=32,
            num_layers=1,
            num_heads=4,
            attention_types=[[["global"], 1]],
            max_position_embeddings=64,
        ),
    ),
}
BATCH = padded_batch(0, VOCAB, (6, 3, 5, 2), (5, 2, 4, 3))


@pytest.fixture(scope="module")
def logits():
    """`lm.logits(*BATCH)` through one compiled program per graph and mesh (`LanguageModel.logits`
    compiles once per instance, and these tests make many instances of few graphs)."""
    programs = {}

    def run(lm):
        key = (type(lm), lm.graphdef, lm.mesh)
        if key not in programs:
            programs[key] = jax.jit(lambda params, *batch: lm.apply(params, *batch)[0])
        return np.asarray(
            programs[key](lm.params, *shd.shard_batch(lm.mesh, *map(jnp.asarray, BATCH)))
        )

    return run


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """family -> (HF torch model, its directory, our base model)."""
    out = {}
    for name, (config_cls, model_cls, extra) in FAMILIES.items():
        torch.manual_seed(0)
        model = model_cls(config_cls(vocab_size=VOCAB, **extra)).eval()
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path)
        out[name] = (model, path, from_pretrained(path))
    return out


def with_random_adapters(lm, seed=0, std=0.1):
    """`lm` with every adapter leaf redrawn (B != 0), same values on any mesh."""
    adapters, base = lora.split_trainable(lm.params)
    rng = np.random.default_rng(seed)
    new = jax.tree.map(
        lambda x: jax.device_put(rng.normal(0, std, x.shape).astype(np.float32), x.sharding),
        adapters,
    )
    return lm.with_params(lora.combine(new, base))


@pytest.fixture(scope="module")
def adapted(built, logits):
    """family -> (base logits, LoRA model with random adapters, its logits)."""
    out = {}
    for name, (_, _, base) in built.items():
        lm = with_random_adapters(lora.add_lora(base, lora.LoRAConfig(), seed=0), seed=1)
        out[name] = (logits(base), lm, logits(lm))
    return out


def adapted_paths(lm):
    return {path for path, _ in lora.lora_layers(nnx.merge(lm.graphdef, lm.params))}


# -- configuration and targets ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0), "lora.rank must be a positive integer"),
        (dict(alpha=0.0), "lora.alpha must be positive"),
        (dict(dropout=1.0), r"lora.dropout must be in \[0, 1\)"),
        (dict(targets=()), "lora.targets must name"),
    ],
)
def test_bad_config_is_a_one_line_error(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        lora.LoRAConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_paper_defaults():
    cfg = lora.LoRAConfig()
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.targets, cfg.scale) == (
        8,
        32.0,
        0.1,
        ("attention", "mlp"),
        4.0,
    )
    assert lora.LoRAConfig(targets="q_proj, v_proj").targets == ("q_proj", "v_proj")


def test_default_targets_per_family(built):
    expected = {  # one layer each: attention then MLP projections, never lm_head
        "llama": [("layers", 0, "self_attn", p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        + [("layers", 0, "mlp", p) for p in ("gate_proj", "up_proj", "down_proj")],
        "t5": [
            (stack, "block", 0, m, p)
            for stack, attention in (
                ("encoder", ("self_attn",)),
                ("decoder", ("self_attn", "cross_attn")),
            )
            for m, ps in [(a, "qkvo") for a in attention] + [("mlp", ("wi_0", "wi_1", "wo"))]
            for p in ps
        ],
        "gpt_neo": [("h", 0, "attn", p) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
        + [("h", 0, "mlp", p) for p in ("c_fc", "c_proj")],
    }
    for name, (_, _, base) in built.items():
        lm = lora.add_lora(base)
        assert isinstance(lm, lora.LoRAModel) and isinstance(lm, LanguageModel)
        assert adapted_paths(lm) == set(expected[name]), name
        adapters, rest = lora.split_trainable(lm.params)
        assert jax.tree.structure(rest) == jax.tree.structure(base.params), (
            name
        )  # nothing else added
        flat = dict(nnx.to_flat_state(lm.params))
        for path in expected[name]:
            kernel, a, b = (flat[path + (leaf,)] for leaf in ("kernel", "lora_a", "lora_b"))
            d_in, d_out = kernel.shape
            assert a.shape == (d_in, 8) and b.shape == (8, d_out) and isinstance(a, nnx.LoRAParam)
            in_axis, out_axis = kernel.get_metadata()["axes"]
            assert a.get_metadata()["axes"] == (in_axis, None) and b.get_metadata()["axes"] == (
                None,
                out_axis,
            )
            assert not np.any(np.asarray(b.get_value()))  # B = 0
            assert 0 < np.abs(a.get_value()).max() <= d_in**-0.5  # PEFT's kaiming-uniform bound


def test_explicit_targets(built):
    lm = lora.add_lora(built["llama"][2], lora.LoRAConfig(targets=("q_proj", "v_proj")))
    assert {p[-1] for p in adapted_paths(lm)} == {"q_proj", "v_proj"} and len(
        adapted_paths(lm)
    ) == 2
    t5 = lora.add_lora(built["t5"][2], lora.LoRAConfig(targets=("attention",)))
    assert {p[-2] for p in adapted_paths(t5)} == {"self_attn", "cross_attn"} and len(
        adapted_paths(t5)
    ) == 4 + 8
    # An adapter's initial A depends on the seed and its path, not on which other projections are
    # adapted.
    a_only = dict(nnx.to_flat_state(lm.params))[
        ("layers", 0, "self_attn", "q_proj", "lora_a")
    ].get_value()
    a_all = dict(nnx.to_flat_state(lora.add_lora(built["llama"][2]).params))[
        ("layers", 0, "self_attn", "q_proj", "lora_a")
    ].get_value()
    np.testing.assert_array_equal(a_only, a_all)


@pytest.mark.parametrize(
    "family,target,valid",
    [
        (
            "llama",
            "qproj",
            "valid: attention, mlp, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)",
        ),
        (
            "t5",
            "wi",
            "valid: attention, mlp, q, k, v, o, wi_0, wi_1, wo)",
        ),  # gated T5 has no plain wi
        (
            "gpt_neo",
            "lm_head",
            "valid: attention, mlp, q_proj, k_proj, v_proj, out_proj, c_fc, c_proj)",
        ),
    ],
)
def test_unknown_target_is_a_one_line_error(built, family, target, valid):
    with pytest.raises(ValueError) as e:
        lora.add_lora(built[family][2], lora.LoRAConfig(targets=("attention", target)))
    msg = str(e.value)
    assert (
        "\n" not in msg
        and f"unknown LoRA target '{target}' for model_type '{family}'" in msg
        and msg.endswith(valid)
    )


def test_add_twice_or_merge_plain_is_an_error(built):
    base = built["llama"][2]
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.add_lora(lora.add_lora(base))
    with pytest.raises(ValueError, match="no adapters"):
        lora.merge_lora(base)


# -- numerics -------------------------------------------------------------------------------------


def test_fresh_adapters_add_exact_zeros(built, adapted, logits):
    # One layer (with a bias), bit for bit: B = 0 makes the adapter path an exact zero.
    base, lm, path = (
        built["gpt_neo"][2],
        lora.add_lora(built["gpt_neo"][2], seed=3),
        ("h", 0, "mlp", "c_proj"),
    )
    linear = dict(nnx.iter_graph(nnx.merge(base.graphdef, base.params)))[path]
    adapted_linear = dict(nnx.iter_graph(nnx.merge(lm.graphdef, lm.params)))[path]
    assert type(adapted_linear) is lora.LoRALinear and type(linear) is not lora.LoRALinear
    x = np.random.default_rng(0).normal(size=(4, 5, linear.kernel.shape[0])).astype(np.float32)
    np.testing.assert_array_equal(
        jax.jit(lambda v: adapted_linear(v))(x), jax.jit(lambda v: linear(v))(x)
    )
    # Whole model: equal up to how XLA fuses the extra (zero) terms into neighbouring reductions,
    # which can move the last bit (seen on a two-layer GPT-Neo: 6e-8).
    for name, (_, _, base) in built.items():
        np.testing.assert_allclose(
            logits(lora.add_lora(base, seed=3)), adapted[name][0], rtol=0, atol=1e-6, err_msg=name
        )


def test_merged_logits_equal_adapter_logits(built, adapted, logits):
    for name, (base_logits, lm, lora_logits) in adapted.items():
        real = BATCH[3].astype(bool)
        assert np.abs(lora_logits - base_logits)[real].max() > 1e-2, name  # the adapters matter
        merged = lora.merge_lora(lm)
        assert type(merged) is LanguageModel and merged.graphdef == built[name][2].graphdef, name
        assert jax.tree.structure(merged.params) == jax.tree.structure(built[name][2].params), name
        assert max_abs_diff_real(logits(merged), lora_logits, BATCH[3]) <= 1e-5, name


def test_merge_is_w_plus_scaled_ab(adapted):
    lm = adapted["llama"][1]
    flat = dict(nnx.to_flat_state(lm.params))
    merged = dict(nnx.to_flat_state(lora.merge_lora(lm).params))
    path = ("layers", 0, "mlp", "down_proj")
    w, a, b = (
        np.asarray(flat[path + (leaf,)].get_value(), np.float64)
        for leaf in ("kernel", "lora_a", "lora_b")
    )
    np.testing.assert_allclose(
        merged[path + ("kernel",)].get_value(), w + 32.0 / 8 * a @ b, rtol=1e-6, atol=1e-7
    )
    np.testing.assert_array_equal(
        merged[("norm", "scale")].get_value(), flat[("norm", "scale")].get_value()
    )


@pytest.mark.parametrize(
    "family,loader",
    [("llama", transformers.AutoModelForCausalLM), ("t5", transformers.T5ForConditionalGeneration)],
)
def test_save_pretrained_writes_the_merged_model(built, adapted, tmp_path, family, loader):
    _, lm, lora_logits = adapted[family]
    lm.save_pretrained(str(tmp_path))  # a LoRA model exports merged, never its bare base
    names = lambda d: set(safe_open(f"{d}/model.safetensors", "np").keys())
    assert names(tmp_path) == names(built[family][1])
    hf = loader.from_pretrained(str(tmp_path)).eval()
    assert max_abs_diff_real(lora_logits, reference_logits(hf, *BATCH), BATCH[3]) <= 1e-4


def test_prefill_decode_equal_full_pass(adapted):
    lm = adapted["llama"][1]
    pi, pm, ri, _ = BATCH
    full = np.asarray(lm.logits(pi, pm, ri, np.ones_like(ri)))  # every response token real
    logits, cache = jax.jit(lm.prefill, static_argnums=3)(
        lm.params, jnp.asarray(pi), jnp.asarray(pm), ri.shape[1]
    )
    steps, decode = [logits], jax.jit(lm.decode)
    for t in range(ri.shape[1] - 1):
        logits, cache = decode(lm.params, jnp.asarray(ri[:, t]), cache)
        steps.append(logits)
    np.testing.assert_allclose(np.stack(steps, 1), full, atol=1e-5)


def test_dropout_only_with_an_rng(built, adapted, logits):
    _, lm, deterministic = adapted["llama"]
    forward = jax.jit(lambda params, rng: lm.apply(params, *map(jnp.asarray, BATCH), rng=rng)[0])
    one, again, other = (np.asarray(forward(lm.params, jax.random.key(k))) for k in (0, 0, 1))
    real = BATCH[3].astype(bool)
    np.testing.assert_array_equal(one, again)  # a key fixes the masks
    assert np.abs(one - other)[real].max() > 1e-3 and np.abs(one - deterministic)[real].max() > 1e-3
    np.testing.assert_array_equal(logits(lm), deterministic)  # rng=None: no dropout
    # Dropout acts on the adapter path only: with B = 0 an rng changes nothing.
    fresh = lora.add_lora(built["llama"][2])
    np.testing.assert_array_equal(
        np.asarray(forward(fresh.params, jax.random.key(0))), adapted["llama"][0]
    )


# -- training -------------------------------------------------------------------------------------


def test_training_moves_adapters_only(built, logits):
    base_lm = built["llama"][2]
    lm = lora.add_lora(base_lm, lora.LoRAConfig(), seed=0)
    adapters, base = lora.split_trainable(lm.params)
    base_before = jax.tree.map(np.array, base)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10))
    state = TrainState.create(
        jax.tree.map(jnp.copy, adapters), optimizer
    )  # the step donates its state
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(adapters))
    moments = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moments == sorted(adapter_shapes * 2)  # Adam's mu and nu, for adapters only

    loss_fn, frozen_fn = methods.SFT().objective(lm, combine=lora.objective_combine)
    step = make_train_step(loss_fn, optimizer, frozen_fn=frozen_fn)
    pi, pm, ri, rm = map(jnp.asarray, BATCH)
    batch = SequenceBatch(prompt_ids=pi, prompt_mask=pm, response_ids=ri, response_mask=rm)
    seen = []
    for _ in range(5):
        state, metrics = step(state, batch, {lora.FROZEN_KEY: base})
        seen.append(reduce_metrics(metrics)["loss"])
    assert seen[-1] < seen[0] - 1e-3, seen

    for before, after, original in zip(
        jax.tree.leaves(base_before), jax.tree.leaves(base), jax.tree.leaves(base_lm.params)
    ):
        assert np.array_equal(before, np.asarray(after)) and np.array_equal(
            before, np.asarray(original)
        )
    for path, b in nnx.to_flat_state(state.params):
        if path[-1] == "lora_b":
            assert np.abs(np.asarray(b.get_value())).min() > 0, path  # no entry of any B still zero
    trained = lm.with_params(lora.combine(state.params, base))
    assert isinstance(trained, lora.LoRAModel) and trained.lora == lm.lora
    merged = lora.merge_lora(trained)
    assert max_abs_diff_real(logits(merged), logits(trained), BATCH[3]) <= 1e-5


# -- sharding -------------------------------------------------------------------------------------


def test_adapters_sharded_on_a_mesh(built, adapted, logits):
    mesh = shd.make_mesh((2, 2, 2))
    lm = with_random_adapters(lora.add_lora(from_pretrained(built["llama"][1], mesh=mesh)), seed=1)
    adapters, _ = lora.split_trainable(lm.params)
    expected = shd.param_shardings(adapters, mesh)
    for (path, var), (_, want) in zip(nnx.to_flat_state(adapters), nnx.to_flat_state(expected)):
        want = want.get_value() if isinstance(want, nnx.Variable) else want
        assert var.get_value().sharding == want, path
    flat = dict(nnx.to_flat_state(adapters))
    assert flat[("layers", 0, "self_attn", "q_proj", "lora_a")].get_value().sharding.spec == P(
        "fsdp", None
    )
    assert flat[("layers", 0, "self_attn", "q_proj", "lora_b")].get_value().sharding.spec == P(
        None, "tensor"
    )
    assert flat[("layers", 0, "mlp", "down_proj", "lora_b")].get_value().sharding.spec == P(
        None, "fsdp"
    )

    single = adapted["llama"][2]
    assert max_abs_diff_real(logits(lm), single, BATCH[3]) <= 1e-5
    merged = lora.merge_lora(lm)
    kernel = ("layers", 0, "self_attn", "q_proj", "kernel")
    assert (
        dict(nnx.to_flat_state(merged.params))[kernel].get_value().sharding
        == dict(nnx.to_flat_state(lm.params))[kernel].get_value().sharding
    )
    assert max_abs_diff_real(logits(merged), single, BATCH[3]) <= 1e-5

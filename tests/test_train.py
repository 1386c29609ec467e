"""Train step: schedule, exact gradient accumulation, NaN guard, objectives, sharded equality."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from plad_jax import losses, methods
from plad_jax import sharding as shd
from plad_jax.data import PairBatch, SequenceBatch
from plad_jax.models import from_pretrained, init_model, lora
from plad_jax.training.step import (
    NonFiniteLossError,
    OptimizerConfig,
    TrainState,
    check_finite,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    reduce_metrics,
)
from tests.helpers import padded_batch

VOCAB = 64
LENS_P, LENS_R = (6, 3, 5, 2, 6, 4, 1, 5), (4, 2, 5, 1, 3, 5, 2, 4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    path = str(tmp_path_factory.mktemp("llama"))
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def sft_batch(seed=0):
    pi, pm, ri, rm = padded_batch(seed, VOCAB, LENS_P, LENS_R)
    return SequenceBatch(prompt_ids=pi, prompt_mask=pm, response_ids=ri, response_mask=rm)


def pair_batch(seed=0):
    pi, pm, yp, mp = padded_batch(seed, VOCAB, LENS_P, LENS_R)
    _, _, yn, mn = padded_batch(seed + 1, VOCAB, LENS_P, LENS_R[::-1])
    return PairBatch(
        prompt_ids=pi,
        prompt_mask=pm,
        chosen_ids=yp,
        chosen_mask=mp,
        rejected_ids=yn,
        rejected_mask=mn,
    )


def test_schedule_warmup_then_linear_decay():
    lr = learning_rate_schedule(OptimizerConfig(learning_rate=1e-3, warmup_steps=4, total_steps=12))
    expected = {0: 0.0, 2: 5e-4, 4: 1e-3, 8: 5e-4, 12: 0.0}
    for step, value in expected.items():
        assert float(lr(step)) == pytest.approx(value, abs=1e-9), step


def run_steps(lm, method, n=3, mesh=None, grad_accum=1, batch_fn=sft_batch, optimizer=None):
    knobs = {} if method == "sft" else {"beta": 0.5}
    loss_fn, frozen_fn = methods.get(method, **knobs).objective(lm)
    optimizer = optimizer or make_optimizer(
        OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10)
    )
    state = TrainState.create(lm.params, optimizer)
    step = make_train_step(loss_fn, optimizer, grad_accum=grad_accum, frozen_fn=frozen_fn)
    frozen = {"reference": jax.tree.map(jnp.copy, lm.params)} if method == "dpo" else {}
    losses_seen = []
    for i in range(n):
        batch = shd.place_batch(mesh, batch_fn(i))
        state, metrics = step(state, batch, frozen)
        check_finite(metrics, i)
        losses_seen.append(reduce_metrics(metrics)["loss"])
    return np.array(losses_seen), jax.tree.map(np.asarray, state.params)


# The accumulation tests compare parameters after plain SGD steps: the parameters then move by the
# gradient itself, so they check the accumulated gradient. Adam would divide each gradient by its
# own scale, turning a float summation-order difference in a near-zero gradient into a visible one
# (1.8e-5 relative after two steps on one CPU).
ACCUMULATION_SGD = optax.sgd(0.1)


def test_grad_accumulation_equals_one_big_batch(model_dir):
    lm = from_pretrained(model_dir)
    loss1, params1 = run_steps(lm, "sft", n=2, optimizer=ACCUMULATION_SGD)
    loss2, params2 = run_steps(
        from_pretrained(model_dir), "sft", n=2, grad_accum=4, optimizer=ACCUMULATION_SGD
    )
    np.testing.assert_allclose(loss2, loss1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params2)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_frozen_outputs_are_split_with_their_rows(model_dir):
    """DPO's reference log-probs (`batch.frozen_outputs`, computed once before the gradient) go
    into the micro-batches with the rows they belong to: at the reference every pair's margin is
    0 (loss log 2), and accumulation equals the one big batch."""
    kwargs = dict(n=2, batch_fn=pair_batch, optimizer=ACCUMULATION_SGD)
    loss1, params1 = run_steps(from_pretrained(model_dir), "dpo", **kwargs)
    loss2, params2 = run_steps(from_pretrained(model_dir), "dpo", grad_accum=4, **kwargs)
    assert loss1[0] == pytest.approx(np.log(2.0), rel=1e-6)
    np.testing.assert_allclose(loss2, loss1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params2)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_sft_loss_decreases_and_matches_direct_loss(model_dir):
    lm = from_pretrained(model_dir)
    batch = sft_batch(0)
    logits = lm.logits(*batch.inputs())
    direct, _ = losses.sft_loss(logits, batch.response_ids, batch.response_mask)
    seen, _ = run_steps(lm, "sft", n=6, batch_fn=lambda i: sft_batch(0))
    assert seen[0] == pytest.approx(float(direct), rel=1e-6)
    assert seen[-1] < seen[0]


def test_nan_loss_leaves_state_untouched():
    params = {"w": jnp.ones(3)}
    optimizer = optax.sgd(0.1)

    def loss_fn(p, frozen, batch, rng):
        loss = jnp.sum(p["w"] * batch["x"])
        return loss, {"loss": (loss, jnp.float32(1.0))}

    step = make_train_step(loss_fn, optimizer, donate=False)
    state = TrainState.create(params, optimizer)
    state, metrics = step(state, {"x": jnp.array([1.0, jnp.nan, 0.0])}, {})
    np.testing.assert_array_equal(state.params["w"], np.ones(3))
    assert int(state.step) == 0
    with pytest.raises(NonFiniteLossError, match="step 7: loss or gradient is NaN/Inf"):
        check_finite(metrics, 7)


@pytest.mark.parametrize("method,batch_fn", [("sft", sft_batch), ("plad_rank", pair_batch)])
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_steps_equal_single_device(model_dir, method, batch_fn, mesh_shape):
    ref_losses, ref_params = run_steps(from_pretrained(model_dir), method, batch_fn=batch_fn)
    mesh = shd.make_mesh(mesh_shape)
    got_losses, got_params = run_steps(
        from_pretrained(model_dir, mesh=mesh), method, mesh=mesh, batch_fn=batch_fn
    )
    np.testing.assert_allclose(got_losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(got_params)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


TINY = {
    "llama": dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "gpt_neo": dict(
        model_type="gpt_neo",
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
        max_position_embeddings=64,
    ),
    "t5": dict(
        model_type="t5",
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    ),
}


def sft_value_and_grad(lm, trainable, combine, logits_path: bool):
    """Jitted (loss, grads) of one padded SFT batch, with a dropout key: through `methods.SFT`
    (chunked log-probs) or through the [B, R, V] logits and `losses.sft_loss` (the reference)."""
    loss_fn, _ = methods.SFT().objective(lm, combine=combine)
    if logits_path:

        def loss_fn(params, frozen, b, rng):
            logits, _ = lm.apply(combine(params, frozen), *b.inputs(), rng=rng)
            return losses.sft_loss(logits, b.response_ids, b.response_mask)

    batch = jax.tree.map(jnp.asarray, sft_batch())
    fn = jax.jit(jax.value_and_grad(lambda p, f: loss_fn(p, f, batch, jax.random.key(3))[0]))
    return fn(*trainable)


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("adapters", [True, False], ids=["lora", "full"])
def test_remat_and_chunked_logprobs_keep_loss_and_gradients(family, adapters):
    """Every remat policy, with the chunked log-prob path, gives the loss and gradients of the
    logits path without remat: LoRA with dropout on (nonzero adapters), and full fine-tuning
    (gradients through the embeddings / output layer too)."""
    base = init_model(TINY[family])
    if adapters:
        lm = lora.add_lora(base, lora.LoRAConfig(rank=2, dropout=0.2))
        trainable, frozen = lora.split_trainable(lm.params)
        keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(trainable))))
        trainable = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape), trainable)
        combine = lora.combine
    else:
        lm, trainable, frozen, combine = base, base.params, {}, methods.full_params
    want_loss, want_grads = sft_value_and_grad(lm, (trainable, frozen), combine, logits_path=True)
    for remat in ("none", "full", "dots"):
        loss, grads = sft_value_and_grad(
            lm.with_remat(remat), (trainable, frozen), combine, logits_path=False
        )
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6, err_msg=remat)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
            scale = float(np.abs(want).max())  # fp32 sums in another order: ulps of the largest
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3 * scale, err_msg=remat)
        assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


def compiled_temp_bytes(layers: int, remat: str, batch=2, prompt=120, response=8, hidden=64) -> int:
    """XLA's temporaries for the gradient of a LoRA SFT loss (dropout on), every token real."""
    lm = lora.add_lora(
        init_model(
            dict(
                TINY["llama"],
                num_hidden_layers=layers,
                hidden_size=hidden,
                intermediate_size=2 * hidden,
            )
        ),
        lora.LoRAConfig(rank=2, dropout=0.1),
    ).with_remat(remat)
    trainable, frozen = lora.split_trainable(lm.params)
    loss_fn, _ = methods.SFT().objective(lm, combine=lora.combine)
    ids = lambda n: jnp.asarray(np.random.default_rng(n).integers(0, VOCAB, (batch, n)), jnp.int32)
    b = SequenceBatch(
        prompt_ids=ids(prompt),
        prompt_mask=jnp.ones((batch, prompt), jnp.int32),
        response_ids=ids(response),
        response_mask=jnp.ones((batch, response), jnp.int32),
    )
    grad = jax.jit(jax.grad(lambda p, f: loss_fn(p, f, b, jax.random.key(3))[0]))
    return grad.lower(trainable, frozen).compile().memory_analysis().temp_size_in_bytes


def test_remat_full_keeps_about_one_block_input_per_layer():
    """With LoRA dropout on, each extra layer costs `remat=full` about its block input ([B, T, D]
    fp32, 64 KB here), not its dropout masks: with the masks drawn early (untied keys) it cost
    1.8 MB a layer, with only the backward's keys tied 0.57 MB."""
    block_input = 2 * 128 * 64 * 4
    per_layer = (compiled_temp_bytes(6, "full") - compiled_temp_bytes(2, "full")) / 4
    assert per_layer < 2 * block_input, per_layer


def test_remat_switch_rejects_unknown_policy():
    lm = init_model(TINY["llama"])
    assert lm.with_remat("full").remat == "full" and lm.remat == "none"
    assert lora.add_lora(lm.with_remat("dots")).with_params(lm.params).remat == "dots"
    with pytest.raises(ValueError, match="remat must be one of none, full, dots"):
        lm.with_remat("all")

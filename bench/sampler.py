"""Sampler speed: plad_jax `generate` vs transformers PyTorch `generate` (KV cache), same weights.

    python -m bench.sampler [--threads N] [--models llama,t5] [--batches 16,64] [--repeats 2]
                            [--stop-only]
    python -m bench.sampler --model PATH    # a real checkpoint (safetensors dir or GGUF file),
                                            # EOS off in both, so every row runs to the end

For a ~30M-parameter LLaMA-class model and a comparable T5 v1.1 (random weights, built with
transformers and loaded with `plad_jax.models.from_pretrained`), greedy decoding of a prompt of
128 tokens into exactly 128 new tokens per row (no EOS) at batch 16 and 64: generated tokens/s
for both libraries, and their ratio. Then the decode time per token at 64 vs 512 new tokens
(batch 16), `(t(N) - t(1)) / (N - 1)`, which takes prefill out, for both libraries: how much a
step slows down as the context grows (every step reads the whole context's keys and values).
Last, what stop strings cost (batch of the first `--batches`): our tokens/s with three stop
strings that never match (matched inside the jitted loop on every step, as in a real run) vs
none, same model, runs alternating, and their ratio; and, since a busy machine's noise is larger
than the effect, the check alone in microseconds per step next to the whole decode step's
(`--stop-only`: this part alone).

Timing: wall clock, best of `--repeats` runs, the two libraries alternating run by run so a busy
machine hurts both alike. Our first call compiles; compile time (first call minus the best run)
is reported separately and excluded from throughput. Both libraries get `--threads` CPU threads
(torch.set_num_threads; XLA's CPU thread pool is sized from the process's CPU affinity).
Prints one table.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

PROMPT, NEW = 128, 128
LENGTHS = (64, 512)
# Never produced by the bench's models (the ours() assertion checks it): the loop checks them at
# every step and never stops early, so any cost they have shows in tokens/s.
STOP_STRINGS = ("\n\nHuman:", "\n\nAssistant:", "</answer>")


def llama_config(transformers):
    return transformers.LlamaConfig(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )


def t5_config(transformers):
    return transformers.T5Config(
        vocab_size=8000,
        d_model=384,
        d_kv=64,
        d_ff=1024,
        num_layers=6,
        num_decoder_layers=6,
        num_heads=6,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        eos_token_id=None,
        pad_token_id=0,
        decoder_start_token_id=0,
    )


MODELS = {
    "llama": ("LlamaForCausalLM", llama_config),
    "t5": ("T5ForConditionalGeneration", t5_config),
}


def build(name, directory):
    """A random transformers model saved to `directory`, with no EOS so every row runs to the
    end."""
    import torch
    import transformers

    cls_name, make_config = MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(make_config(transformers)).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory)
    return model


def prompts(batch, vocab, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab, (batch, PROMPT)).astype(np.int32), np.ones(
        (batch, PROMPT), np.int32
    )


def ours(lm, ids, mask, new_tokens, stop=None):
    """Seconds for one plad_jax greedy generation (returns host arrays, so it is synchronous)."""
    from plad_jax.generation.sampler import generate

    t0 = time.perf_counter()
    out = generate(lm, ids, mask, max_new_tokens=new_tokens, temperature=0.0, stop=stop)
    elapsed = time.perf_counter() - t0
    assert out.mask.all(), "a row stopped early; the bench needs exactly new_tokens per row"
    return elapsed


def theirs(model, ids, mask, new_tokens, **generate_kwargs):
    """Seconds for one transformers greedy generation on the model's device, with its default
    (dynamic) KV cache unless `generate_kwargs` say otherwise (cache_implementation="static")."""
    import torch

    with torch.inference_mode():
        t0 = time.perf_counter()
        tensor = lambda x: torch.tensor(x, dtype=torch.long, device=model.device)
        out = model.generate(
            input_ids=tensor(ids),
            attention_mask=tensor(mask),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            use_cache=True,
            **generate_kwargs,
        )
        out = out.cpu()  # synchronises the device
        elapsed = time.perf_counter() - t0
    produced = out.shape[1] - (1 if model.config.is_encoder_decoder else ids.shape[1])
    assert produced == new_tokens, produced
    return elapsed


def throughput_row(name, model, lm, batch, repeats):
    ids, mask = prompts(batch, lm.vocab_size)
    first = ours(lm, ids, mask, NEW)  # compiles
    theirs(model, ids[:2], mask[:2], 2)  # warm-up
    ours_best = theirs_best = float("inf")
    for _ in range(repeats):
        ours_best = min(ours_best, ours(lm, ids, mask, NEW))
        theirs_best = min(theirs_best, theirs(model, ids, mask, NEW))
    tokens = batch * NEW
    print(
        f"  {name} batch {batch}: plad_jax {tokens / ours_best:.0f} tok/s, transformers "
        f"{tokens / theirs_best:.0f} tok/s",
        flush=True,
    )
    return tokens / ours_best, tokens / theirs_best, first - ours_best


def decode_ms_per_token(model, lm, batch, repeats):
    """(ours, theirs): ms per decode step at each of LENGTHS new tokens, prefill excluded."""
    ids, mask = prompts(batch, lm.vocab_size)
    best = {}
    for n in (1,) + LENGTHS:
        ours(lm, ids, mask, n)  # compiles
        runs = repeats if n < 256 else 1
        best[n] = (
            min(ours(lm, ids, mask, n) for _ in range(runs)),
            min(theirs(model, ids, mask, n) for _ in range(runs)),
        )
    return tuple([(best[n][i] - best[1][i]) / (n - 1) * 1e3 for n in LENGTHS] for i in (0, 1))


def bench_tokenizer(vocab_size):
    """A byte-level BPE tokenizer (GPT-2 / LLaMA-3 style) with about the models' vocabulary, trained
    here on the Python standard library's source, so the stop-string table has a real layout."""
    import glob
    import json as json_module

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    stdlib = os.path.dirname(os.path.dirname(json_module.__file__))
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))[:60]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train(files, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>")


def stop_cost_row(name, lm, batch, repeats):
    """(tok/s without stop strings, with STOP_STRINGS): the same generation, runs alternating."""
    from plad_jax.generation.sampler import stop_strings

    stop = stop_strings(bench_tokenizer(lm.vocab_size), STOP_STRINGS)
    assert stop.layout is not None
    ids, mask = prompts(batch, lm.vocab_size)
    ours(lm, ids, mask, NEW), ours(lm, ids, mask, NEW, stop)  # compile both
    plain = with_stop = float("inf")
    for _ in range(repeats):
        plain = min(plain, ours(lm, ids, mask, NEW))
        with_stop = min(with_stop, ours(lm, ids, mask, NEW, stop))
    tokens = batch * NEW
    print(
        f"  {name} batch {batch}: no stop strings {tokens / plain:.0f} tok/s, "
        f"{len(STOP_STRINGS)} stop strings {tokens / with_stop:.0f} tok/s",
        flush=True,
    )
    return tokens / plain, tokens / with_stop, stop_check_us(stop, batch), plain / NEW * 1e6


def stop_check_us(stop, batch, steps=2000):
    """Microseconds of the stop-string check alone per decode step: `steps` checks in one jitted
    loop (the tokenization the loop would carry), so neither dispatch nor the model is timed."""
    import jax
    import jax.numpy as jnp

    from plad_jax.generation.sampler import StopTable, stop_hit

    tables = StopTable(jnp.asarray(stop.table), jnp.asarray(stop.lengths))

    @jax.jit
    def run(recent):
        def body(i, carry):
            recent, hits = carry
            recent = jnp.concatenate([recent[:, 1:], (recent[:, :1] * 7 + i) % 8000], axis=1)
            return recent, hits + stop_hit(recent, tables, stop.layout)

        return jax.lax.fori_loop(0, steps, body, (recent, jnp.zeros(batch, jnp.int32)))[1]

    recent = jnp.full((batch, stop.layout.window), 5, jnp.int32)
    run(recent).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        run(recent).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best / steps * 1e6


def real_checkpoint(path):
    """(name, transformers model, plad_jax model) of a real checkpoint, neither stopping at EOS."""
    from bench.checkpoint import load_torch, model_type, without_eos
    from plad_jax.models import from_pretrained

    seq2seq = model_type(path) == "t5"
    model = load_torch(path, seq2seq=seq2seq)
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    return os.path.basename(path.rstrip("/"))[:24], model, without_eos(from_pretrained(path))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--models", default="llama,t5")
    parser.add_argument(
        "--model",
        help="a real checkpoint (safetensors directory or GGUF file) instead of the random configs",
    )
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--no-decode", action="store_true", help="skip the 64 vs 512 new-token decode timing"
    )
    parser.add_argument(
        "--stop-only", action="store_true", help="only the stop strings' cost (no transformers)"
    )
    args = parser.parse_args(argv)

    os.sched_setaffinity(
        0, sorted(os.sched_getaffinity(0))[: args.threads]
    )  # before XLA sizes its pool
    import jax
    import torch

    torch.set_num_threads(args.threads)

    from plad_jax.models import from_pretrained

    device = f"{jax.devices()[0].platform.upper()} {platform.machine()}, {args.threads} threads"
    batches = [int(b) for b in args.batches.split(",")]
    rows, decode_rows, stop_rows = [], [], []
    for name in [None] if args.model else args.models.split(","):
        if args.model:
            name, model, lm = real_checkpoint(args.model)
        else:
            with tempfile.TemporaryDirectory() as directory:
                model = build(name, directory)
                lm = from_pretrained(directory)
        params = f"{lm.num_params() / 1e6:.1f}M"
        for batch in batches if not args.stop_only else ():
            rows.append(
                (name, params, batch, *throughput_row(name, model, lm, batch, args.repeats))
            )
        if not (args.no_decode or args.stop_only):
            decode_rows.append((name, *decode_ms_per_token(model, lm, batches[0], args.repeats)))
        stop_rows.append((name, params, *stop_cost_row(name, lm, batches[0], args.repeats)))
    if rows:
        print_throughput(rows, device)
    if decode_rows:
        print_decode(decode_rows, batches[0])
    print_stop(stop_rows, batches[0], device)


def print_throughput(rows, device):
    print(
        f"\nsampler throughput: greedy, fp32, prompt {PROMPT}, {NEW} new tokens per row, device "
        f"{device}"
    )
    print(
        f"{'model':<6} {'params':>7} {'batch':>5} {'prompt':>6} {'new':>4} {'plad_jax tok/s':>15} "
        f"{'transformers tok/s':>19} {'ratio':>6} {'our compile s':>13}"
    )
    for name, params, batch, ours_tps, theirs_tps, compile_s in rows:
        print(
            f"{name:<6} {params:>7} {batch:>5} {PROMPT:>6} {NEW:>4} {ours_tps:>15.0f} "
            f"{theirs_tps:>19.0f} {ours_tps / theirs_tps:>5.2f}x {compile_s:>13.1f}"
        )


def print_decode(decode_rows, batch):
    print(
        f"\ndecode time per token, prompt {PROMPT}, batch {batch} (prefill excluded), "
        f"ms at {LENGTHS[0]} and {LENGTHS[1]} new tokens"
    )
    short, long = str(LENGTHS[0]), str(LENGTHS[1])
    print(
        f"{'model':<6} {'plad_jax @' + short:>13} {'@' + long:>6} {'growth':>7} "
        f"{'transformers @' + short:>17} {'@' + long:>6} {'growth':>7}"
    )
    for name, (o_short, o_long), (t_short, t_long) in decode_rows:
        print(
            f"{name:<6} {o_short:>13.1f} {o_long:>6.1f} {o_long / o_short:>6.2f}x "
            f"{t_short:>17.1f} {t_long:>6.1f} {t_long / t_short:>6.2f}x"
        )


def print_stop(stop_rows, batch, device):
    print(
        f"\nstop strings: plad_jax greedy tok/s with {len(STOP_STRINGS)} that never match vs "
        f"none, batch {batch}, prompt {PROMPT}, {NEW} new tokens, device {device}"
    )
    print(
        f"{'model':<6} {'params':>7} {'none tok/s':>11} {'stop tok/s':>11} {'ratio':>6} "
        f"{'check us/step':>13} {'step us':>8}"
    )
    for name, params, plain, with_stop, check_us, step_us in stop_rows:
        print(
            f"{name:<6} {params:>7} {plain:>11.0f} {with_stop:>11.0f} {with_stop / plain:>5.3f}x "
            f"{check_us:>13.1f} {step_us:>8.0f}"
        )


if __name__ == "__main__":
    main()

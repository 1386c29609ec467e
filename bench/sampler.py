"""Sampler speed: plad_jax `generate` vs transformers PyTorch `generate` (KV cache), same weights.

    python -m bench.sampler [--quick] [--threads N] [--models llama,t5]

For a ~30M-parameter LLaMA-class model and a comparable T5 v1.1 (random weights, built with
transformers and loaded with `plad_jax.models.from_pretrained`), greedy decoding of a prompt of
128 tokens into exactly 128 new tokens (no EOS) at batch 16 and 64: generated tokens/s for both,
and their ratio. Then plad_jax's decode time per token at 64 vs 512 new tokens (batch 16),
from `(t(N) - t(1)) / (N - 1)`, which takes prefill out. Our compile time is excluded from
throughput (every shape is run once first) and reported separately. Both libraries get the same
CPU threads. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np

PROMPT, NEW = 128, 128
BATCHES = (16, 64)
LENGTHS = (64, 512)


def llama_config(transformers):
    return transformers.LlamaConfig(
        vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=2048, bos_token_id=1, eos_token_id=None, pad_token_id=0)


def t5_config(transformers):
    return transformers.T5Config(
        vocab_size=8000, d_model=384, d_kv=64, d_ff=1024, num_layers=6, num_decoder_layers=6, num_heads=6,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, eos_token_id=None, pad_token_id=0,
        decoder_start_token_id=0)


MODELS = {"llama": ("LlamaForCausalLM", llama_config), "t5": ("T5ForConditionalGeneration", t5_config)}


def build(name, directory):
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
    return rng.integers(3, vocab, (batch, PROMPT)).astype(np.int32), np.ones((batch, PROMPT), np.int32)


def time_ours(lm, ids, mask, new_tokens, repeats=2):
    """(seconds per call, first-call seconds): the first call compiles."""
    from plad_jax.sampler import generate
    t0 = time.perf_counter()
    out = generate(lm, ids, mask, max_new_tokens=new_tokens, temperature=0.0)
    first = time.perf_counter() - t0
    assert out.mask.all(), "a row stopped early; the bench needs exactly new_tokens per row"
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(lm, ids, mask, max_new_tokens=new_tokens, temperature=0.0)
        best = min(best, time.perf_counter() - t0)
    return best, first


def time_hf(model, ids, mask, new_tokens, repeats=1):
    import torch
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  use_cache=True)
    with torch.inference_mode():
        model.generate(input_ids=ids_t[:2], attention_mask=mask_t[:2], max_new_tokens=4, do_sample=False,
                       pad_token_id=0)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids_t, attention_mask=mask_t, **kwargs)
            best = min(best, time.perf_counter() - t0)
    produced = out.shape[1] - (0 if model.config.is_encoder_decoder else ids.shape[1])
    assert produced >= new_tokens, produced
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--models", default="llama,t5")
    parser.add_argument("--quick", action="store_true", help="batch 16 only, skip the 512-token decode")
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    import jax

    from plad_jax.models import from_pretrained

    device = f"{jax.devices()[0].platform.upper()} ({platform.processor() or platform.machine()}, {args.threads} threads)"
    rows, decode_rows = [], []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as directory:
            model = build(name, directory)
            lm = from_pretrained(directory)
        params = f"{lm.num_params() / 1e6:.1f}M"
        for batch in BATCHES[:1] if args.quick else BATCHES:
            ids, mask = prompts(batch, lm.vocab_size)
            ours, first = time_ours(lm, ids, mask, NEW)
            theirs = time_hf(model, ids, mask, NEW)
            tokens = batch * NEW
            rows.append((name, params, batch, tokens / ours, tokens / theirs, first - ours))
            print(f"  {name} batch {batch}: plad_jax {tokens / ours:.0f} tok/s, transformers {tokens / theirs:.0f} tok/s",
                  flush=True)
        if not args.quick:
            ids, mask = prompts(BATCHES[0], lm.vocab_size)
            base, _ = time_ours(lm, ids, mask, 1)
            per_token = []
            for n in LENGTHS:
                total, _ = time_ours(lm, ids, mask, n)
                per_token.append((total - base) / (n - 1) * 1e3)
            decode_rows.append((name, BATCHES[0], *per_token))

    print(f"\nsampler throughput: greedy, prompt {PROMPT}, {NEW} new tokens, fp32, device {device}")
    print(f"{'model':<7} {'params':>7} {'batch':>5} {'prompt':>6} {'new':>4} {'plad_jax tok/s':>15} "
          f"{'transformers tok/s':>19} {'ratio':>6} {'compile s':>9}")
    for name, params, batch, ours, theirs, compile_s in rows:
        print(f"{name:<7} {params:>7} {batch:>5} {PROMPT:>6} {NEW:>4} {ours:>15.0f} {theirs:>19.0f} "
              f"{ours / theirs:>5.2f}x {compile_s:>9.1f}")
    if decode_rows:
        print(f"\nplad_jax decode time per token (prompt {PROMPT}, batch {BATCHES[0]})")
        print(f"{'model':<7} {'ms/token @64':>13} {'ms/token @512':>14} {'512/64':>7}")
        for name, batch, short, long in decode_rows:
            print(f"{name:<7} {short:>13.2f} {long:>14.2f} {long / short:>6.2f}x")


if __name__ == "__main__":
    main()

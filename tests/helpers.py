"""Shared test utilities: padded batches, the PyTorch reference logits (row by row, unpadded) and
greedy continuations, and the tiny model family configs the sampler tests and
`bench/accelerator.py` build. References run on the HF model's device (CPU in tests)."""

from __future__ import annotations

import numpy as np
import torch


def padded_batch(seed, vocab, prompt_lens, response_lens, low=3):
    """Right-padded int32 (prompt_ids, prompt_mask, response_ids, response_mask); pads hold 0."""
    rng = np.random.default_rng(seed)
    p, r = max(prompt_lens), max(response_lens)
    pm = (np.arange(p)[None] < np.asarray(prompt_lens)[:, None]).astype(np.int32)
    rm = (np.arange(r)[None] < np.asarray(response_lens)[:, None]).astype(np.int32)
    pi = rng.integers(low, vocab, pm.shape).astype(np.int32) * pm
    ri = rng.integers(low, vocab, rm.shape).astype(np.int32) * rm
    return pi, pm, ri, rm


# Rows of different lengths; every row but the first carries padding in prompt and response.
PROMPT_LENS = (9, 4, 6, 2)
RESPONSE_LENS = (7, 5, 3, 2)

# Tiny configs of each family, as the sampler tests build them (transformers config kwargs).
VOCAB = 96
LLAMA = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    pad_token_id=0,
    initializer_range=0.2,
)
# num_decoder_layers == num_layers: transformers 5.24 T5 `generate` breaks (cache IndexError)
# otherwise.
T5 = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    decoder_start_token_id=0,
    pad_token_id=0,
    initializer_factor=2.0,
)  # 3.0 gave logits up to 180, where fp32 rounding alone is ~1e-4
GPT_NEO = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_heads=4,
    num_layers=2,
    window_size=4,
    attention_types=[[["global", "local"], 1]],
    max_position_embeddings=128,
    bos_token_id=1,
    pad_token_id=0,
    initializer_range=0.2,
)
FAMILIES = {
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", LLAMA),
    "t5_v1_1": ("T5Config", "T5ForConditionalGeneration", T5),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", GPT_NEO),
}


def prompt_batch(seed=0, lens=PROMPT_LENS, low=3):
    """Right-padded [B, P] prompts of different lengths (pads hold 0)."""
    rng = np.random.default_rng(seed)
    p = max(lens)
    mask = (np.arange(p)[None] < np.asarray(lens)[:, None]).astype(np.int32)
    return (rng.integers(low, VOCAB, mask.shape) * mask).astype(np.int32), mask


@torch.no_grad()
def hf_greedy(model, ids, mask, new_tokens):
    """transformers greedy continuations, one list per row: up to and including the first EOS."""
    lens = mask.sum(1)
    enc = model.config.is_encoder_decoder
    left_ids, left_mask = np.zeros_like(ids), np.zeros_like(mask)
    for b, n in enumerate(lens):  # decoder-only: transformers' convention is left padding
        left_ids[b, ids.shape[1] - n :], left_mask[b, ids.shape[1] - n :] = ids[b, :n], 1
    feed_ids, feed_mask = (ids, mask) if enc else (left_ids, left_mask)
    out = model.generate(
        input_ids=torch.tensor(feed_ids, dtype=torch.long, device=model.device),
        attention_mask=torch.tensor(feed_mask, dtype=torch.long, device=model.device),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=model.config.pad_token_id,
    )
    new = out[:, 1:] if enc else out[:, ids.shape[1] :]  # T5: drop the decoder start token
    eos = model.generation_config.eos_token_id
    rows = []
    for row in new.cpu().numpy().tolist():
        hit = [i for i, t in enumerate(row) if eos is not None and t == eos]
        rows.append(row[: hit[0] + 1] if hit else row)
    return rows


@torch.no_grad()
def reference_logits(hf_model, pi, pm, ri, rm):
    """transformers logits for each row run alone without padding, laid out like
    `LanguageModel.logits`.

    Padded positions are NaN so a comparison that looks at them fails loudly.
    """
    out = np.full(ri.shape + (hf_model.config.vocab_size,), np.nan, np.float32)
    dev = hf_model.device
    for b in range(pi.shape[0]):
        p = pi[b, : pm[b].sum()]
        r = ri[b, : rm[b].sum()]
        if hf_model.config.is_encoder_decoder:
            start = hf_model.config.decoder_start_token_id
            dec = np.concatenate([[start], r[:-1]])
            logits = hf_model(
                input_ids=torch.tensor(p, device=dev)[None],
                decoder_input_ids=torch.tensor(dec, device=dev)[None],
            ).logits[0]
        else:
            ids = np.concatenate([p, r])
            logits = hf_model(input_ids=torch.tensor(ids, device=dev)[None]).logits
            logits = logits[0, len(p) - 1 : len(p) - 1 + len(r)]
        out[b, : len(r)] = logits.float().cpu().numpy()
    return out


def max_abs_diff_real(ours, ref, rm):
    """Largest |ours - ref| over real response positions."""
    real = rm.astype(bool)
    return float(np.max(np.abs(np.asarray(ours)[real] - ref[real])))


@torch.no_grad()
def randomize_weights(model, seed, std=0.2):
    """Redraw every weight: N(0, std) matrices, N(0, std/2) vectors, norm scales around 1.

    transformers' default init (std 0.02) makes attention nearly uniform, so a wrong attention
    scale, window or position would hide under the parity tolerance; these weights expose it.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        if p.ndim == 1 and ("norm" in name or ".ln_" in name) and name.endswith("weight"):
            p.copy_(1.0 + std * noise)
        else:
            p.copy_((std if p.ndim >= 2 else std / 2) * noise)
    return model

"""Shared test utilities: padded batches and the PyTorch reference logits, row by row, unpadded."""

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


@torch.no_grad()
def reference_logits(hf_model, pi, pm, ri, rm):
    """transformers logits for each row run alone without padding, laid out like `LanguageModel.logits`.

    Padded positions are NaN so a comparison that looks at them fails loudly.
    """
    out = np.full(ri.shape + (hf_model.config.vocab_size,), np.nan, np.float32)
    for b in range(pi.shape[0]):
        p = pi[b, : pm[b].sum()]
        r = ri[b, : rm[b].sum()]
        if hf_model.config.is_encoder_decoder:
            start = hf_model.config.decoder_start_token_id
            dec = np.concatenate([[start], r[:-1]])
            logits = hf_model(input_ids=torch.tensor(p)[None], decoder_input_ids=torch.tensor(dec)[None]).logits[0]
        else:
            ids = np.concatenate([p, r])
            logits = hf_model(input_ids=torch.tensor(ids)[None]).logits[0, len(p) - 1: len(p) - 1 + len(r)]
        out[b, : len(r)] = logits.float().numpy()
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

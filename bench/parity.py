"""A real checkpoint's parity with transformers on real text: fp32 logits and greedy decoding.

    python bench/parity.py --model "$(python -m plad_jax.fetch smollm2-135m-instruct)"

Both libraries load the same file (a safetensors directory or a GGUF, dequantized to fp32 by
each); for each prompt: the largest absolute difference of the next-token logits over every
position, and whether greedy decoding (up to `--new` tokens, each stopping at its EOS) gives the
same tokens.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench.checkpoint

PROMPTS = (
    'def fibonacci(n):\n    """',
    "The capital of France is",
    "Summarize: The quick brown fox jumps over the lazy dog because it was bored.",
    "import numpy as np\n\ndef softmax(x):",
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="safetensors directory or GGUF file")
    parser.add_argument("--new", type=int, default=32, help="greedy tokens per prompt")
    args = parser.parse_args(argv)

    import torch

    from bench.checkpoint import load_torch
    from plad_jax.generation import sampler
    from plad_jax.models import from_pretrained
    from plad_jax.models.hf import load_tokenizer

    tok, theirs = load_tokenizer(args.model), load_torch(args.model)
    ours = from_pretrained(args.model)
    print(f"{args.model}: fp32, {len(PROMPTS)} prompts, greedy {args.new} new tokens")
    print("| tokens | max abs logits diff | max abs logit | greedy equal | plad_jax greedy text |")
    print("|---|---|---|---|---|")
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            ref = theirs(torch.tensor([ids])).logits[0, :-1].numpy()
            hf = theirs.generate(torch.tensor([ids]), max_new_tokens=args.new, do_sample=False)
        head, rest = np.array([ids[:1]], np.int32), np.array([ids[1:]], np.int32)
        logits = np.asarray(ours.logits(head, np.ones_like(head), rest, np.ones_like(rest)))[0]
        out = sampler.generate(
            ours, np.array([ids], np.int32), np.ones((1, len(ids)), np.int32),
            max_new_tokens=args.new, temperature=0.0,
        )  # fmt: skip
        mine = np.asarray(out.tokens)[0][np.asarray(out.mask)[0].astype(bool)].tolist()
        same = mine == hf[0, len(ids) :].tolist()
        text = tok.decode(mine, skip_special_tokens=True)[:40]
        print(
            f"| {len(ids)} | {np.abs(logits - ref).max():.2e} | {np.abs(ref).max():.1f} | "
            f"{same} | {text!r} |"
        )


if __name__ == "__main__":
    main()

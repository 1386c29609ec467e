"""Forward-pass throughput and peak memory: plad_jax vs transformers (PyTorch), same CPU, same run.

Each (framework, model) pair runs in its own subprocess so peak memory is its own: the figure is
peak RSS minus RSS right after imports (weights + activations + runtime buffers).

    python bench/forward.py                 # ~110M LLaMA-class and ~120M T5, batch 8, 128 + 128
                                            # tokens
    python bench/forward.py --quick         # tiny models, to check the script runs
    python bench/forward.py --model PATH    # a real checkpoint: safetensors directory or GGUF file
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench.checkpoint

MODELS = {
    "llama": dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    ),
    "t5": dict(
        vocab_size=32128,
        d_model=768,
        d_kv=64,
        d_ff=2048,
        num_layers=6,
        num_decoder_layers=6,
        num_heads=12,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
    ),
}
QUICK = {
    "llama": dict(
        MODELS["llama"],
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "t5": dict(
        MODELS["t5"],
        vocab_size=512,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
    ),
}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_checkpoint(family, quick, path):
    import torch
    import transformers

    torch.manual_seed(0)
    kwargs = (QUICK if quick else MODELS)[family]
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    else:
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**kwargs))
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def batch(args, vocab):
    import numpy as np

    rng = np.random.default_rng(0)
    shape_p, shape_r = (args.batch, args.prompt), (args.batch, args.response)
    return (
        rng.integers(3, vocab, shape_p).astype(np.int32),
        np.ones(shape_p, np.int32),
        rng.integers(3, vocab, shape_r).astype(np.int32),
        np.ones(shape_r, np.int32),
    )


def time_calls(fn, iters):
    fn()  # warm-up (compilation for JAX)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def worker(args):
    """Runs in a subprocess: one framework, one model; prints a JSON line."""
    if args.framework == "jax":
        import jax

        from plad_jax.models import from_pretrained

        base = rss_mb()
        lm = from_pretrained(args.path)
        params = lm.num_params()
        pi, pm, ri, rm = batch(args, lm.vocab_size)
        seconds = time_calls(lambda: lm.logits(pi, pm, ri, rm).block_until_ready(), args.iters)
        device = jax.devices()[0].device_kind
    else:
        import torch

        torch.set_num_threads(os.cpu_count())
        base = rss_mb()
        from bench.checkpoint import load_torch

        model = load_torch(args.path, seq2seq=args.family == "t5")
        params = sum(p.numel() for p in model.parameters())
        pi, pm, ri, rm = (
            torch.tensor(a, dtype=torch.long) for a in batch(args, model.config.vocab_size)
        )

        @torch.no_grad()
        def run():
            if args.family == "t5":
                return model(
                    input_ids=pi, attention_mask=pm, decoder_input_ids=ri, decoder_attention_mask=rm
                ).logits
            return model(
                input_ids=torch.cat([pi, ri], 1), attention_mask=torch.cat([pm, rm], 1)
            ).logits

        seconds = time_calls(run, args.iters)
        device = "cpu"
    tokens = args.batch * (args.prompt + args.response)
    print(
        json.dumps(
            {
                "tok_s": tokens / seconds,
                "peak_mb": peak_rss_mb() - base,
                "device": device,
                "params": params,
            }
        )
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--families", default="llama,t5")
    parser.add_argument(
        "--model",
        help="a real checkpoint (safetensors directory or GGUF file) instead of the random configs",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--framework", help=argparse.SUPPRESS)
    parser.add_argument("--family", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in [None] if args.model else args.families.split(","):
            if args.model:
                from bench.checkpoint import model_type

                path, family = args.model, model_type(args.model)
            else:
                path = os.path.join(tmp, family)
                make_checkpoint(family, args.quick, path)
            result = {}
            for framework in ("jax", "torch"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--framework",
                    framework,
                    "--family",
                    family,
                    "--path",
                    path,
                    "--batch",
                    str(args.batch),
                    "--prompt",
                    str(args.prompt),
                    "--response",
                    str(args.response),
                    "--iters",
                    str(args.iters),
                ]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True)
                result[framework] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((family, result["torch"]["params"], result))

    print(
        f"forward pass, batch {args.batch}, prompt {args.prompt} + response {args.response} "
        f"tokens, fp32, {platform.processor() or platform.machine()} x{os.cpu_count()} "
        f"({rows[0][2]['jax']['device']})"
    )
    head = (
        f"| {'model':<6} | {'params':>7} | {'plad_jax tok/s':>14} | {'torch tok/s':>11} | "
        f"{'speed ratio':>11} | {'plad_jax peak MB':>16} | {'torch peak MB':>13} | "
        f"{'memory ratio':>12} |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for family, n, r in rows:
        j, t = r["jax"], r["torch"]
        print(
            f"| {family:<6} | {n / 1e6:6.1f}M | {j['tok_s']:14.0f} | {t['tok_s']:11.0f} | "
            f"{j['tok_s'] / t['tok_s']:10.2f}x | {j['peak_mb']:16.0f} | {t['peak_mb']:13.0f} | "
            f"{j['peak_mb'] / t['peak_mb']:11.2f}x |"
        )


if __name__ == "__main__":
    main()

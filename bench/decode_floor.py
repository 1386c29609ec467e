"""The fastest a `bench/sampler.py` LLaMA run could be on this machine: a floor, not a model.

    python -m bench.decode_floor [--batch 16]

One decode step of the sampler bench's LLaMA (8 layers, hidden 512, GQA 8/4, MLP 1376, vocabulary
8000, fp32) does at least its weight matmuls on a [batch, hidden] activation: q/k/v/o, gate/up/down
per layer and the output head. This times exactly those matmuls (no attention, no cache, no
sampling), 128 steps in one jitted `fori_loop`, and the same in PyTorch eager; and the prefill's
matmul work (2 x layer params x batch x 128 prompt tokens) at the measured fp32 matmul peak. From
them, the best tokens/s any implementation of the bench's run (prompt 128, 128 new tokens) can
reach here:  batch x 128 / (prefill floor + 128 x step floor). A second ceiling adds what every
decode step must also do, read the keys and values of every slot written so far (129 ... 256 slots
x layers x kv heads x head_dim x 2 x 4 bytes per row), at the best read bandwidth XLA reaches on
this machine (a jitted sum over an array of the cache's size).

Prints one table: step floor (JAX, PyTorch), copy bandwidth and the weight-read time it implies,
matmul peak, prefill floor, XLA read bandwidth and the cache-read time per step, and the two
throughput ceilings.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

PROMPT, NEW = 128, 128


def shapes():
    """(layer matrices, number of layers, head) of the sampler bench's LLaMA, from its config."""
    import transformers

    from bench.sampler import llama_config

    c = llama_config(transformers)
    d, f, kv = (
        c.hidden_size,
        c.intermediate_size,
        c.num_key_value_heads * (c.hidden_size // c.num_attention_heads),
    )
    layer = {
        "q": (d, d),
        "k": (d, kv),
        "v": (d, kv),
        "o": (d, d),
        "gate": (d, f),
        "up": (d, f),
        "down": (f, d),
    }
    return layer, c.num_hidden_layers, (d, c.vocab_size)


def kv_bytes_per_slot(batch):
    """Bytes of keys and values one cache slot holds over all layers and rows (fp32)."""
    layer, n, _ = shapes()
    return batch * n * 2 * layer["k"][1] * 4


def weights(seed=0):
    layer, n, head = shapes()
    rng = np.random.default_rng(seed)
    w = lambda s: (rng.standard_normal(s) * 0.02).astype(np.float32)
    return [{k: w(s) for k, s in layer.items()} for _ in range(n)], w(head)


def best_of(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def jax_step_ms(layers, head, batch):
    import jax
    import jax.numpy as jnp

    d = head.shape[0]

    def step(params, x):
        ls, w_head = params
        for p in ls:
            attn_in = (
                x @ p["q"] + jnp.mean(x @ p["k"]) + jnp.mean(x @ p["v"])
            )  # k and v feed the result
            x = x + attn_in @ p["o"]
            x = x + (jax.nn.silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"]
        return (
            x + (x @ w_head)[:, :d] * 1e-6
        )  # the head's output feeds the next step, so it is kept

    run = jax.jit(lambda params, x: jax.lax.fori_loop(0, NEW, lambda i, x: step(params, x), x))
    params = jax.device_put((layers, head))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, d)).astype(np.float32))
    run(params, x).block_until_ready()
    return best_of(lambda: run(params, x).block_until_ready()) / NEW * 1e3


def torch_step_ms(layers, head, batch):
    import torch

    ls = [{k: torch.tensor(v) for k, v in p.items()} for p in layers]
    w_head, d = torch.tensor(head), head.shape[0]

    def step(x):
        for p in ls:
            attn_in = x @ p["q"] + (x @ p["k"]).mean() + (x @ p["v"]).mean()
            x = x + attn_in @ p["o"]
            x = x + (torch.nn.functional.silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"]
        return x + (x @ w_head)[:, :d] * 1e-6

    def run():
        y = x0
        for _ in range(NEW):
            y = step(y)

    with torch.inference_mode():
        x0 = torch.randn(batch, d)
        run()
        return best_of(run) / NEW * 1e3


def matmul_peak_gflops():
    """fp32 GFLOP/s of a large square matmul in XLA (the compute ceiling the prefill works
    against)."""
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.asarray(np.random.default_rng(2).standard_normal((n, n)).astype(np.float32))
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    return 2 * n**3 / best_of(lambda: mm(a).block_until_ready()) / 1e9


def read_gb_per_s(nbytes):
    """GB/s of XLA streaming through `nbytes` (a jitted sum): the rate a decode step can read its
    cache at."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(3).standard_normal(nbytes // 4).astype(np.float32))
    total = jax.jit(jnp.sum)
    total(a).block_until_ready()
    return nbytes / best_of(lambda: total(a).block_until_ready(), repeats=10) / 1e9


def copy_gb_per_s():
    a = np.ones(64 * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    return 2 * a.nbytes / best_of(lambda: np.copyto(b, a), repeats=10) / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    layers, head = weights()
    layer_params = sum(a.size for p in layers for a in p.values())
    weight_mb = (layer_params + head.size) * 4 / 1e6
    step_jax, step_torch = (
        jax_step_ms(layers, head, args.batch),
        torch_step_ms(layers, head, args.batch),
    )
    bandwidth, peak = copy_gb_per_s(), matmul_peak_gflops()
    prefill_s = 2 * layer_params * args.batch * PROMPT / (peak * 1e9)
    ceiling = args.batch * NEW / (prefill_s + NEW * step_jax / 1e3)
    per_slot = kv_bytes_per_slot(args.batch)
    read = read_gb_per_s(per_slot * (PROMPT + NEW))
    cache_ms = [
        per_slot * (PROMPT + i + 1) / (read * 1e9) * 1e3 for i in range(NEW)
    ]  # slots written at step i
    with_cache = args.batch * NEW / (prefill_s + (NEW * step_jax + sum(cache_ms)) / 1e3)
    print(
        f"decode floor, sampler-bench LLaMA ({weight_mb:.0f} MB of matmul weights), batch "
        f"{args.batch}, fp32"
    )
    print(
        f"  weight matmuls per decode step: JAX {step_jax:.1f} ms, PyTorch eager {step_torch:.1f} "
        "ms"
    )
    print(
        f"  copy bandwidth {bandwidth:.1f} GB/s: reading the weights once takes "
        f"{weight_mb / bandwidth:.1f} ms"
    )
    print(
        f"  fp32 matmul peak {peak:.0f} GFLOP/s: prefill of {args.batch} x {PROMPT} tokens >= "
        f"{prefill_s:.2f} s"
    )
    print(
        f"  XLA read bandwidth {read:.1f} GB/s: reading the cache takes {cache_ms[0]:.1f} ms at "
        f"the first decode step ({PROMPT + 1} slots), {cache_ms[-1]:.1f} ms at the last "
        f"({PROMPT + NEW})"
    )
    print(
        f"  ceiling for prompt {PROMPT} + {NEW} new tokens: {ceiling:.0f} tok/s "
        f"(= {args.batch} x {NEW} / (prefill floor + {NEW} x step floor); attention, cache and "
        "sampling excluded)"
    )
    print(f"  ceiling with the cache read as well: {with_cache:.0f} tok/s")


if __name__ == "__main__":
    main()

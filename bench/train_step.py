"""Train-step throughput and model-FLOPs utilisation: plad_jax vs transformers (PyTorch), same run.

Two steps on a ~110M-parameter LLaMA-class model (hidden 768, 12 layers, 12 heads / 4 KV heads,
ff 2048, vocab 32000 tied), batch 4 x (64 prompt + 64 response) tokens, fp32, AdamW, grad-norm
clipping 1.0, every token real:

    sft        CE over response tokens; one forward + backward over B sequences
    plad_rank  PLaD rank calibration (Eq. 4, beta 1) on length-normalised sequence log-probs; one
               forward + backward over 2B sequences (prompt + y+ and prompt + y-)

plad_jax runs `methods.get(step).objective` + `train.make_train_step` on its default device; torch
runs `LlamaForCausalLM` loaded from the same `save_pretrained` directory with the same batch, the
same loss written out in torch, `clip_grad_norm_` and `torch.optim.AdamW`. Both compute logits on
response positions only. Each (framework, step) runs in its own subprocess.

tok/s counts every token a step runs through the model (sequences x (prompt + response)).
Model FLOPs per step: 6 x (params outside the LM head) per token + 6 x (LM-head params) per
response token (+ 2 x N per token of a frozen model; none in these two steps); attention-score
FLOPs are not counted. MFU divides model FLOP/s by the device's measured fp32 matmul peak: each
framework times a large matmul on its device first, and the higher figure is the device's peak.
Compile time (jit lower + compile) and torch's first step are excluded from tok/s and reported
separately.

    python bench/train_step.py            # ~110M model, a few minutes on 2 CPU cores
    python bench/train_step.py --quick    # tiny model, to check the script runs
    python bench/train_step.py --model PATH   # a real LLaMA-class checkpoint (dir or GGUF)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench.checkpoint

MODEL = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    tie_word_embeddings=True,
)
QUICK = dict(
    MODEL,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
STEPS = ("sft", "plad_rank")
BETA = 1.0  # PLaD margin
LEARNING_RATE = 1e-4


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_checkpoint(quick: bool, path: str) -> int:
    return save_random_llama(QUICK if quick else MODEL, path)


def save_random_llama(fields: dict, path: str) -> int:
    """A random-weight transformers LLaMA of config `fields` saved to `path`; its parameter
    count."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def token_arrays(args, vocab: int):
    """(prompt [B, P], response, y+, y- [B, R]) int32 ids, every token real; y- differs from y+.
    Both frameworks read these (the torch workers without importing JAX)."""
    import numpy as np

    rng = np.random.default_rng(0)
    ids = lambda length: rng.integers(3, vocab, (args.batch, length)).astype(np.int32)
    return ids(args.prompt), ids(args.response), ids(args.response), ids(args.response)


def make_batch(args, vocab: int, step_name: str = "sft"):
    """plad_jax's batch of `token_arrays` for a step (masks all 1): a `PairBatch` of y+ and y- for
    plad_rank, else the `SequenceBatch` of the prompt and response."""
    import numpy as np

    from plad_jax.data import PairBatch, SequenceBatch

    prompt, response, chosen, rejected = token_arrays(args, vocab)
    ones = np.ones_like
    if step_name != "plad_rank":
        return SequenceBatch(
            prompt_ids=prompt,
            prompt_mask=ones(prompt),
            response_ids=response,
            response_mask=ones(response),
        )
    return PairBatch(
        prompt_ids=prompt,
        prompt_mask=ones(prompt),
        chosen_ids=chosen,
        chosen_mask=ones(chosen),
        rejected_ids=rejected,
        rejected_mask=ones(rejected),
    )


def time_steps(run_step, iters: int) -> list[float]:
    """Seconds of each of `iters` steps; run_step() must block until the step is done."""
    seconds = []
    for _ in range(iters):
        start = time.perf_counter()
        run_step()
        seconds.append(time.perf_counter() - start)
    return seconds


# -- workers (one framework, one step, in a subprocess; print one JSON line) ---------------------


def jax_matmul_peak(n: int, repeats: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, precision="highest"))
    mm(a, b).block_until_ready()
    best = min(time_steps(lambda: mm(a, b).block_until_ready(), repeats))
    return 2 * n**3 / best


def torch_matmul_peak(n: int, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(time_steps(lambda: torch.mm(a, b), repeats))
    return 2 * n**3 / best


def jax_step_timing(lm, step_name: str, batch, iters: int, warmup: int, teacher=None) -> dict:
    """Compile and time plad_jax's train step (`step_name` = an objective method) on `batch`
    (`make_batch`).

    teacher: a frozen LanguageModel for the teacher-logit methods (kd, ...), run inside the step.
    Returns compile_s, first_step_s (first step after compile), step_s (median) and first_loss.
    """
    import jax

    from plad_jax import methods
    from plad_jax.training.step import (
        OptimizerConfig,
        TrainState,
        make_optimizer,
        make_train_step,
        reduce_metrics,
    )

    batch = jax.tree.map(jax.numpy.asarray, batch)
    method = methods.get(step_name, **({"beta": BETA} if step_name == "plad_rank" else {}))
    loss_fn, frozen_fn = method.objective(lm, teacher=teacher)
    frozen = {"teacher": teacher.params} if teacher is not None else {}
    optimizer = make_optimizer(
        OptimizerConfig(learning_rate=LEARNING_RATE, warmup_steps=0, total_steps=10**6)
    )
    state = TrainState.create(jax.tree.map(jax.numpy.copy, lm.params), optimizer)  # it is donated
    start = time.perf_counter()
    step = make_train_step(loss_fn, optimizer, frozen_fn=frozen_fn)
    step = step.lower(state, batch, frozen).compile()
    compile_s = time.perf_counter() - start
    first_loss = None

    def run_step():
        nonlocal state, first_loss
        state, metrics = step(state, batch, frozen)
        loss = reduce_metrics(metrics)["loss"]  # blocks on the step
        first_loss = loss if first_loss is None else first_loss

    warm = time_steps(run_step, warmup)
    seconds = time_steps(run_step, iters)
    return {
        "compile_s": compile_s,
        "first_step_s": warm[0] if warm else None,
        "step_s": statistics.median(seconds),
        "first_loss": first_loss,
    }


def jax_worker(args) -> dict:
    import jax

    from plad_jax.models import from_pretrained

    peak = jax_matmul_peak(args.matmul)
    lm = from_pretrained(args.path)
    batch = make_batch(args, lm.vocab_size, args.step)
    timing = jax_step_timing(lm, args.step, batch, args.iters, args.warmup)
    device = jax.devices()[0]
    return {
        "device": cpu_name() if device.platform == "cpu" else device.device_kind,
        "device_kind": device.device_kind,
        "platform": device.platform,
        "peak": peak,
        **timing,
        "version": jax.__version__,
        "params": lm.num_params(),
    }


def torch_step_timing(
    model,
    step_name: str,
    tokens: tuple,
    iters: int,
    warmup: int,
    *,
    autocast=None,
    fused=None,
    compiled=False,
) -> dict:
    """Time transformers + torch AdamW on the same step as `jax_step_timing` (sft or plad_rank),
    on the `token_arrays` `tokens` (every token real).

    autocast: a torch dtype for `torch.autocast` on the model's device (bf16 compute over the
    model's fp32 master weights), None for plain fp32. fused: AdamW's fused kernel (CUDA).
    compiled: run the loss through `torch.compile` (a backend name, or True for the default).
    """
    import contextlib

    import torch

    device = next(model.parameters()).device
    model.train()  # dropout is 0 in LLaMA configs; train() only matches the usual training setup
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=LEARNING_RATE,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        fused=fused,
    )
    prompt, response, chosen, rejected = (
        torch.tensor(x, dtype=torch.long, device=device) for x in tokens
    )
    ones, r = torch.ones_like, response.shape[1]
    cast = contextlib.nullcontext
    if autocast:
        cast = lambda: torch.autocast(device.type, dtype=autocast)  # noqa: E731

    def response_logprobs(prompt, prompt_mask, response, response_mask):
        """[B, R] log p(response token | prefix); logits on the R positions that predict them."""
        ids, mask = torch.cat([prompt, response], 1), torch.cat([prompt_mask, response_mask], 1)
        with cast():
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=r + 1).logits[:, :-1]
        return torch.log_softmax(logits.float(), -1).gather(-1, response[..., None])[..., 0]

    def loss_fn():
        if step_name == "sft":
            logp = response_logprobs(prompt, ones(prompt), response, ones(response))
            mask = ones(response).float()
            return -(logp * mask).sum() / mask.sum()
        n = chosen.shape[0]  # y+ and y- in one forward over 2B rows, as plad_jax does
        both = torch.cat([chosen, rejected])
        logp = response_logprobs(
            torch.cat([prompt] * 2), torch.cat([ones(prompt)] * 2), both, ones(both)
        )
        mask = ones(both).float()
        seq = (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # length-normalised
        return torch.relu(BETA - seq[:n] + seq[n:]).mean()

    if compiled:
        loss_fn = torch.compile(loss_fn, **({} if compiled is True else {"backend": compiled}))
    first_loss = None

    def run_step():
        nonlocal first_loss
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = float(loss)  # synchronises the device
        first_loss = value if first_loss is None else first_loss

    warm = time_steps(run_step, warmup)
    seconds = time_steps(run_step, iters)
    return {
        "first_step_s": warm[0] if warm else None,
        "step_s": statistics.median(seconds),
        "first_loss": first_loss,
    }


def torch_worker(args) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count())
    peak = torch_matmul_peak(args.matmul)
    from bench.checkpoint import load_torch

    model = load_torch(args.path)
    tokens = token_arrays(args, model.config.vocab_size)
    timing = torch_step_timing(model, args.step, tokens, args.iters, args.warmup)
    return {
        "device": cpu_name(),
        "device_kind": "cpu",
        "platform": "cpu",
        "peak": peak,
        "compile_s": None,
        **timing,
        "version": torch.__version__,
    }


# -- driver ---------------------------------------------------------------------------------------


def model_flops_per_step(step: str, args, params: int, hidden: int, vocab: int) -> float:
    """6 x non-head params per token + 6 x head params per response token, over the step's
    sequences."""
    sequences = args.batch * (2 if step == "plad_rank" else 1)
    head = hidden * vocab
    return (
        6.0 * sequences * ((params - head) * (args.prompt + args.response) + head * args.response)
    )


def run_worker(framework, step, path, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        framework,
        "--step",
        step,
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
        "--warmup",
        str(args.warmup),
        "--matmul",
        str(args.matmul),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{framework} {step} worker failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, to check the script runs")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument(
        "--matmul", type=int, default=None, help="size n of the n x n fp32 peak matmul"
    )
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument(
        "--model",
        help="a real checkpoint (safetensors directory or GGUF file) "
        "instead of the random ~110M config",
    )
    parser.add_argument("--device-note", default="", help="free text appended to the device line")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.matmul = args.matmul or (512 if args.quick else 2048)
    if args.worker:
        result = (jax_worker if args.worker == "jax" else torch_worker)(args)
        print(json.dumps(result))
        return

    config = QUICK if args.quick else MODEL
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or tmp
        if args.model:
            from bench.checkpoint import hf_config

            config = hf_config(args.model)
        else:
            make_checkpoint(args.quick, tmp)
        for step in args.steps.split(","):
            rows.append((step, {fw: run_worker(fw, step, path, args) for fw in ("jax", "torch")}))
    params = rows[0][1]["jax"]["params"]

    # one peak per device: the best either framework reached on it
    peaks = {}
    for _, r in rows:
        for res in r.values():
            peaks[res["device"]] = max(peaks.get(res["device"], 0.0), res["peak"])
    jax0, torch0 = rows[0][1]["jax"], rows[0][1]["torch"]
    print(
        f"train step, batch {args.batch}, prompt {args.prompt} + response {args.response} tokens, "
        f"fp32, LLaMA-class {params / 1e6:.1f}M params "
        f"({args.model or ('quick' if args.quick else 'full')}), median of {args.iters} steps"
    )
    print(
        f"devices: plad_jax on {jax0['platform']} (jax.devices()[0].device_kind "
        f"'{jax0['device_kind']}', jax {jax0['version']}), torch {torch0['version']} on "
        f"{torch0['platform']}; {jax0['device']}, {os.cpu_count()} "
        f"cores{' - ' + args.device_note if args.device_note else ''}"
    )
    print(
        "fp32 matmul peak ("
        + str(args.matmul)
        + "^3): "
        + ", ".join(
            f"{fw} {max(r[fw]['peak'] for _, r in rows) / 1e9:.0f} GFLOP/s"
            for fw in ("jax", "torch")
        )
    )
    head = (
        f"| {'what':<9} | {'device':<28} | {'plad_jax tok/s':>14} | {'torch tok/s':>11} | "
        f"{'ratio':>6} | {'plad_jax MFU':>12} | {'torch MFU':>9} | {'plad_jax compile s':>18} |"
    )
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for step, r in rows:
        j, t = r["jax"], r["torch"]
        sequences = args.batch * (2 if step == "plad_rank" else 1)
        tokens = sequences * (args.prompt + args.response)
        flops = model_flops_per_step(
            step, args, params, config["hidden_size"], config["vocab_size"]
        )
        device = j["device"] if j["device"] == t["device"] else f"{j['device']} / {t['device']}"
        mfu = lambda res, flops=flops: flops / res["step_s"] / peaks[res["device"]]
        print(
            f"| {step:<9} | {device[:28]:<28} | {tokens / j['step_s']:14.0f} | "
            f"{tokens / t['step_s']:11.0f} | {t['step_s'] / j['step_s']:5.2f}x | {mfu(j):11.1%} | "
            f"{mfu(t):8.1%} | {j['compile_s']:18.1f} |"
        )
    print(
        "first-step loss (plad_jax / torch): "
        + ", ".join(
            f"{step} {r['jax']['first_loss']:.5f} / {r['torch']['first_loss']:.5f}"
            for step, r in rows
        )
    )
    print(
        "first step after compile, excluded (s, plad_jax / torch): "
        + ", ".join(
            f"{step} {r['jax']['first_step_s']:.2f} / {r['torch']['first_step_s']:.2f}"
            for step, r in rows
            if r["jax"]["first_step_s"] is not None
        )
    )


if __name__ == "__main__":
    main()

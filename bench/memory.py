"""Peak memory and speed of a LoRA SFT train step: the logits path vs chunked log-probs, remat
none / dots / full, and transformers + PEFT on the same batch and weights.

Model: SmolLM2-135M's shape with random weights (LLaMA, 30 layers, hidden 576, MLP 1536, 9 query /
3 key-value heads, vocabulary 49,152, tied embeddings, RoPE theta 1e5), fp32. Batch 4 x (512 prompt
+ 64 response) = 576 tokens a row, every token real; LoRA rank 8, alpha 32, dropout 0.1 on the
attention and MLP projections; one AdamW step of SFT (token-mean CE over response tokens).

    old         `LanguageModel.apply` logits [B, R, V] + `losses.sft_loss` (what `sft` ran before)
    none        `methods.SFT`: `LanguageModel.token_logprobs` (chunked, no [B, R, V] kept)
    dots        the same, each block rematerialised keeping its weight projections' outputs
    full        the same, each block rematerialised keeping only its input
    torch       transformers `LlamaForCausalLM` + PEFT LoRA (same targets, rank, alpha, dropout),
                logits on the response positions only, log_softmax + gather, AdamW

Each row runs in a fresh subprocess. "compiled" is XLA's memory analysis of the jitted step
(arguments + outputs + temporaries - donated/aliased; `temp` alone is the activations and
workspace). "RSS" is measured: `before` is the resident set after compilation, before the first
step (weights, runtime, compiled code); `run peak` is the highest resident set while the steps run
(the kernel's high-water mark, reset after compilation, so compile-time memory is not in it), `max`
is `ru_maxrss` of the whole process (compilation included). tok/s counts every token of a step
(B x (P + R)), median of the timed steps, compile and the first step excluded. The first step's
loss must agree: plad_jax rows to 1e-5 relative (same weights, same dropout keys), torch to 1e-4
(LoRA's B starts at 0, so the first loss is the base model's, whatever the dropout draws).

    python bench/memory.py                 # the 135M setting, about an hour on 2 busy CPU cores
    python bench/memory.py --quick         # tiny model, to check the script runs
    python bench/memory.py --rows old,full # some rows only
    python bench/memory.py --table-from a.log b.log  # one table from the `row: {...}` lines that
                                           # runs print on stderr (rows run at different times)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench.train_step
from bench import train_step  # noqa: E402

MODEL = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
    rope_theta=1e5,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
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
ROWS = ("old", "none", "dots", "full", "torch")
LORA = dict(rank=8, alpha=32.0, dropout=0.1)
LEARNING_RATE = 1e-4


def make_checkpoint(quick: bool, path: str) -> int:
    return train_step.save_random_llama(QUICK if quick else MODEL, path)


# -- measuring -------------------------------------------------------------------------------------


def reset_peak_rss():
    """Reset the kernel's resident-set high-water mark (VmHWM) of this process (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """VmHWM: the highest resident set since the process started or `reset_peak_rss`."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(run_step, steps: int):
    if steps == 0:  # compile-time analysis only
        return None, None, [None]
    """(RSS before the steps, peak RSS while they run, seconds of each step); the first step is
    untimed. The peak includes what was resident before (weights, runtime, compiled code)."""
    before = current_rss_bytes()
    reset_peak_rss()
    run_step()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        seconds.append(time.perf_counter() - start)
    return before, peak_rss_bytes(), seconds


# -- workers (one row in a subprocess; print one JSON line) ----------------------------------------


def jax_worker(args) -> dict:
    import jax

    from plad_jax import losses, methods
    from plad_jax.models import from_pretrained, lora
    from plad_jax.training.step import (
        OptimizerConfig,
        TrainState,
        make_optimizer,
        make_train_step,
        reduce_metrics,
    )

    remat = "none" if args.worker == "old" else args.worker
    lm = lora.add_lora(from_pretrained(args.path, remat=remat), lora.LoRAConfig(**LORA))
    adapters, base = lora.split_trainable(lm.params)
    batch = jax.tree.map(jax.numpy.asarray, train_step.make_batch(args, lm.vocab_size))
    loss_fn, _ = methods.SFT().objective(lm, combine=lora.objective_combine)
    if args.worker == "old":

        def loss_fn(params, frozen, b, rng):  # the logits path: [B, R, V] logits, then the loss
            logits, _ = lm.apply(lora.objective_combine(params, frozen), *b.inputs(), rng=rng)
            return losses.sft_loss(logits, b.response_ids, b.response_mask)

    optimizer = make_optimizer(OptimizerConfig(learning_rate=LEARNING_RATE, total_steps=10**6))
    state, frozen = TrainState.create(adapters, optimizer), {lora.FROZEN_KEY: base}
    start = time.perf_counter()
    step = make_train_step(loss_fn, optimizer).lower(state, batch, frozen).compile()
    compile_s = time.perf_counter() - start
    analysis = step.memory_analysis()
    losses_seen = []

    def run_step():
        nonlocal state
        state, metrics = step(state, batch, frozen)
        losses_seen.append(reduce_metrics(metrics)["loss"])  # blocks on the step

    before, run_peak, seconds = timed(run_step, args.steps)
    return {
        "temp": analysis.temp_size_in_bytes,
        "before": before,
        "compiled": (
            analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes
            - analysis.alias_size_in_bytes
        ),
        "run_peak": run_peak,
        "max_rss": max_rss_bytes(),
        "compile_s": compile_s,
        "step_s": seconds[0] if args.steps == 0 else statistics.median(seconds),
        "first_loss": losses_seen[0] if losses_seen else None,
        "version": jax.__version__,
    }


def torch_worker(args) -> dict:
    import peft
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    model = transformers.LlamaForCausalLM.from_pretrained(args.path, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=LORA["rank"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=targets,
        ),
    )
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    # The SFT part of bench/train_step.py's batch, every token real.
    prompt, response = (
        torch.tensor(x, dtype=torch.long)
        for x in train_step.token_arrays(args, model.config.vocab_size)[:2]
    )
    ids = torch.cat([prompt, response], 1)
    mask = torch.ones_like(ids)
    losses_seen = []

    def run_step():
        optimizer.zero_grad(set_to_none=True)
        logits = (
            model(input_ids=ids, attention_mask=mask, logits_to_keep=args.response + 1)
            .logits[:, :-1]
            .float()
        )
        logp = torch.log_softmax(logits, -1).gather(-1, response[..., None])[..., 0]
        real = torch.ones_like(response).float()
        loss = -(logp * real).sum() / real.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses_seen.append(float(loss))

    before, run_peak, seconds = timed(run_step, args.steps)
    return {
        "temp": None,
        "compiled": None,
        "before": before,
        "run_peak": run_peak,
        "max_rss": max_rss_bytes(),
        "compile_s": None,
        "step_s": statistics.median(seconds),
        "first_loss": losses_seen[0],
        "version": f"torch {torch.__version__}, peft {peft.__version__}",
    }


# -- driver ----------------------------------------------------------------------------------------


def run_worker(row: str, path: str, args) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        row,
        "--path",
        path,
        "--batch",
        str(args.batch),
        "--prompt",
        str(args.prompt),
        "--response",
        str(args.response),
        "--steps",
        str(args.steps),
    ]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def results_params(args) -> int:
    """Parameter count of the bench model (tied embeddings), without building it."""
    c = QUICK if args.quick else MODEL
    d, f, layers, vocab = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_hidden_layers"],
        c["vocab_size"],
    )
    head_dim = d // c["num_attention_heads"]
    attention = d * head_dim * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    return vocab * d + layers * (attention + 3 * d * f + 2 * d) + d


def mb(x) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f}"


def print_table(results: dict, args, params: int):
    tokens = args.batch * (args.prompt + args.response)
    print(
        f"LoRA SFT step, LLaMA {params / 1e6:.1f}M params "
        f"({'quick' if args.quick else 'SmolLM2-135M shape'}), batch {args.batch} x "
        f"({args.prompt} prompt + {args.response} response), fp32, {os.cpu_count()} CPU cores, "
        f"median of {args.steps} steps"
    )
    head = (
        f"| {'row':<5} | {'compiled MB':>11} | {'temp MB':>8} | {'RSS before MB':>13} | "
        f"{'run peak RSS MB':>15} | {'vs old':>6} | "
        f"{'max RSS MB':>10} | {'tok/s':>6} | {'vs off':>7} | {'compile s':>9} | "
        f"{'first loss':>10} |"
    )
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    old, none = results.get("old", {}), results.get("none", {})
    off = (
        none if none.get("step_s") else old
    )  # remat off: the chunked path if it ran, else the old one
    for row, r in results.items():
        if "error" in r:
            print(f"| {row:<5} | error: {r['error'][:100]}")
            continue
        vs_old = (
            f"{old['run_peak'] / r['run_peak']:5.2f}x"
            if old.get("run_peak") and r["run_peak"]
            else "-"
        )
        vs_off = (
            f"{off['step_s'] / r['step_s']:6.2f}x" if off.get("step_s") and r["step_s"] else "-"
        )
        tok_s = f"{tokens / r['step_s']:6.0f}" if r["step_s"] else "-"
        loss = "-" if r["first_loss"] is None else f"{r['first_loss']:10.6f}"
        compile_s = "-" if r["compile_s"] is None else f"{r['compile_s']:.0f}"
        print(
            f"| {row:<5} | {mb(r['compiled']):>11} | {mb(r['temp']):>8} | {mb(r['before']):>13} | "
            f"{mb(r['run_peak']):>15} | {vs_old:>6} | "
            f"{mb(r['max_rss']):>10} | {tok_s:>6} | {vs_off:>7} | {compile_s:>9} | {loss:>10} |"
        )
    first = [
        r["first_loss"]
        for row, r in results.items()
        if r.get("first_loss") is not None and row != "torch"
    ]
    if first:
        spread = (max(first) - min(first)) / abs(first[0])
        print(
            f"plad_jax first-step losses agree to {spread:.1e} relative"
            + (
                "; torch differs by "
                f"{abs(results['torch']['first_loss'] - first[0]) / abs(first[0]):.1e}"
                if results.get("torch", {}).get("first_loss") is not None
                else ""
            )
        )
    print(
        "vs old = old row's run peak / this row's (higher is better); vs off = this row's tok/s / "
        "that of remat off (the none row if it ran steps, else old)."
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, to check the script runs")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--response", type=int, default=64)
    parser.add_argument(
        "--steps",
        type=int,
        default=2,
        help="timed steps after one untimed step (0: compile and analyse only, run nothing)",
    )
    parser.add_argument(
        "--table-from", nargs="+", metavar="LOG", help="print one table from these runs' stderr"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps((torch_worker if args.worker == "torch" else jax_worker)(args)))
        return
    if args.quick:
        args.prompt, args.response = min(args.prompt, 24), min(args.response, 8)
    if args.table_from:
        results = {}
        for log in args.table_from:
            with open(log, encoding="utf-8") as f:
                results.update(
                    {
                        row: json.loads(rest)
                        for row, _, rest in (line.partition(": ") for line in f)
                        if row in ROWS
                    }
                )
        print_table(
            {row: results[row] for row in ROWS if row in results}, args, results_params(args)
        )
        return
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown} (choose from {', '.join(ROWS)})")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        params = make_checkpoint(args.quick, tmp)
        for row in rows:
            results[row] = run_worker(row, tmp, args)
            print(f"{row}: {json.dumps(results[row])}", file=sys.stderr, flush=True)
    print_table(results, args, params)


if __name__ == "__main__":
    main()

"""Peak memory of PbKD's white-box moment-matching terms: chunked over positions vs all at once.

What runs: value and gradient of one scalar made of everything both MM players differentiate,

    sum_b mm_gap + sum_b mm_sequence_reward + sum_{b,h} log q(y_h | s_h)

(`plad_jax.losses.pbkd_mm.mm_position_terms` with Q bounded by r_max = 5), with respect to the
student's and the Q-network's inputs, the teacher frozen. Batch 4, response length 1024, vocabulary
32000, fp32, every position real. Two input forms:

    logits    teacher / student / Q logits given as [B, T, V] arrays (what `LanguageModel.apply`
              returns); chunking bounds the softmaxes, products and their cotangents, not the inputs
    features  final hidden states [B, T, D] (D = 1024) and an output head [D, V] per model
              (`pbkd_mm.Projected`); chunking means no [B, T, V] array exists at all

`chunk = all` is the direct computation (the reference); the other rows walk the positions in
blocks (`lax.map` over a rematerialised body). "compiled" figures come from XLA's memory analysis
of the compiled program (arguments + outputs + temporaries - aliased), without running it;
`--run` also executes each row once in its own subprocess and reports the device's peak bytes in
use (accelerators) or the growth of peak RSS from just before the inputs are created (CPU; inputs
included, as in the compiled figure), and the time of one call after compilation.

    python bench/pbkd_memory.py            # compile-time analysis, all rows (~15 s on 2 CPU cores)
    python bench/pbkd_memory.py --run      # + measured peak and time (CPU: up to 4.5 GB, ~6 min)
    python bench/pbkd_memory.py --quick    # small shapes, to check the script runs

Measured with `--run` on 2 CPU cores (peak MB; compiled analysis / measured RSS; s per call):

    logits    all   4,500 / 4,501   12.4 s      features  all   3,705 / 3,804   49.5 s
    logits    128   2,875 / 2,876    5.8 s      features  128   1,147 / 1,280   59.1 s
    logits     32   2,594 / 2,595    5.3 s      features   32     894 /   975   53.9 s

With logits given, the floor is the inputs and their gradients (5 x 500 MB); temporaries fall 21x
(2,000 -> 94 MB) at chunk 32. From features, the whole program shrinks 4x: no [B, T, V] array.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

FULL = dict(batch=4, length=1024, vocab=32000, width=1024)
QUICK = dict(batch=2, length=64, vocab=512, width=64)
CHUNKS = (None, 256, 128, 32)
R_MAX = 5.0


def build(form: str, chunk, batch: int, length: int, vocab: int, width: int):
    """(jitted value-and-grad function, abstract arguments) of one bench row."""
    import jax
    import jax.numpy as jnp

    from plad_jax.losses import pbkd_mm

    project = lambda head, h: jnp.dot(h, head)  # [B, c, D] x [D, V]

    def source(x):
        return pbkd_mm.Projected(x[0], x[1], project) if form == "features" else x

    def objective(student, q_values, teacher, tokens, mask):
        terms = pbkd_mm.mm_position_terms(
            source(teacher), source(student), source(q_values), tokens, chunk=chunk, q_max=R_MAX
        )
        logq = jnp.sum(jnp.where(mask > 0, terms.logq_taken, 0.0))
        return (
            jnp.sum(pbkd_mm.mm_gap(terms, mask))
            + jnp.sum(pbkd_mm.mm_sequence_reward(terms, mask))
            + logq
        )

    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    if form == "features":
        model = (f32(batch, length, width), f32(width, vocab))
    else:
        model = f32(batch, length, vocab)
    ints = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1))), (model, model, model, ints, ints)


def compiled_bytes(form, chunk, shapes) -> dict:
    fn, args = build(form, chunk, **shapes)
    analysis = fn.lower(*args).compile().memory_analysis()
    total = (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    return {"temp": analysis.temp_size_in_bytes, "total": total}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(form: str, chunk, shapes) -> dict:
    """Runs in a subprocess: execute one row once after compiling it; measured peak and time."""
    import jax
    import numpy as np

    fn, abstract = build(form, chunk, **shapes)
    rng = np.random.default_rng(0)
    make = lambda s: (
        rng.integers(0, shapes["vocab"], s.shape).astype(np.int32)
        if s.dtype == np.int32
        else rng.normal(size=s.shape).astype(np.float32) * 0.05
    )
    args = jax.tree.map(make, abstract)
    args = (*args[:4], np.ones_like(args[4]))  # every position real
    device = jax.devices()[0]
    compiled = fn.lower(*abstract).compile()
    baseline = current_rss_bytes()  # after imports and compilation, before any input exists
    args = jax.device_put(args, device)
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    seconds = time.perf_counter() - start
    peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
    return {
        "peak": peak if peak is not None else peak_rss_bytes() - baseline,
        "seconds": seconds,
        "device": device.device_kind,
        "measure": "device peak bytes" if peak is not None else "peak RSS growth",
    }


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_worker(form, chunk, quick) -> dict:
    cmd = [sys.executable, __file__, "--worker", form, str(chunk or 0)] + (
        ["--quick"] if quick else []
    )
    out = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _repo()}
    )
    if out.returncode != 0:
        return {
            "error": out.stderr.strip().splitlines()[-1]
            if out.stderr.strip()
            else f"exit {out.returncode}"
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


def _repo() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mb(x) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f}"


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--run", action="store_true", help="also execute each row in a subprocess")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = QUICK if args.quick else FULL
    if args.worker:
        form, chunk = args.worker[0], int(args.worker[1]) or None
        print(json.dumps(worker(form, chunk, shapes)))
        return
    sys.path.insert(0, _repo())
    import jax

    print(
        f"PbKD MM terms, value + grad; batch {shapes['batch']}, length {shapes['length']}, vocab "
        f"{shapes['vocab']}, width {shapes['width']} (features form); fp32; device "
        f"{jax.devices()[0].device_kind} ({jax.devices()[0].platform})"
    )
    header = (
        f"{'form':<9} {'chunk':>5} | {'temp MB':>9} {'ratio':>6} {'peak MB':>9} {'ratio':>6} "
        "(compiled)"
    )
    if args.run:
        header += f" | {'peak MB':>9} {'ratio':>6} {'s/call':>7} (measured)"
    print(header)
    print("-" * len(header))
    for form in ("logits", "features"):
        reference, measured_reference = None, None
        for chunk in CHUNKS:
            c = compiled_bytes(form, chunk, shapes)
            reference = reference or c
            line = (
                f"{form:<9} {chunk or 'all':>5} | {mb(c['temp']):>9} "
                f"{reference['temp'] / c['temp']:>5.1f}x {mb(c['total']):>9} "
                f"{reference['total'] / c['total']:>5.1f}x"
            )
            if args.run:
                m = run_worker(form, chunk, args.quick)
                if "error" in m:
                    line += f" | error: {m['error'][:60]}"
                else:
                    measured_reference = measured_reference or m["peak"]
                    line += (
                        f" | {mb(m['peak']):>9} {measured_reference / m['peak']:>5.1f}x "
                        f"{m['seconds']:>7.2f} ({m['measure']})"
                    )
            print(line, flush=True)
    print(
        "ratio = figure of the direct computation (chunk all) / figure of the row; higher is "
        "better. temp = XLA temporaries; peak = arguments + outputs (gradients) + temporaries."
    )


if __name__ == "__main__":
    main()

"""plad_jax on an accelerator, checked and measured in one command, within 8 minutes on one H200.

    python bench/accelerator.py --out runs/accelerator        # on the device (one H200: ~7.5 min)
    python bench/accelerator.py --dry-run --out /tmp/acc      # the same code at toy sizes on CPU

Every part runs in its own subprocess under its own time limit (the `PARTS` table: seconds on the
device / in the dry run), writes its results to `part-<name>.json` (in a temporary folder) as each
measurement finishes, and is killed at its limit: a part that runs over is reported as `timeout`
with what it had measured, and the next part starts. The parent imports neither JAX nor PyTorch;
it writes `<out>/accelerator.json` (every part's status, limit, wall time and results),
`<out>/table.md` and `<out>/accelerator.log` (every part's output), three files, and prints the
table last. Exit status 0 when every part is `ok`, 1 otherwise.

Parts (device sizes; `--dry-run` shrinks every size, never the code path):

    correctness   the tiny LLaMA GQA, T5 v1.1 and GPT-Neo models of the tests (`tests.helpers`):
                  logits against transformers on the same device, fp32 at the parity precision
                  (`plad_jax.backend`, highest on GPU/TPU; torch at "highest") to 1e-4, and bf16
                  compute (fp32 weights) to BF16_TOL of the largest reference logit, with torch's
                  own bf16 error beside it; greedy `generate` token-equal to transformers'; with
                  more than one device, the same on a (data, fsdp, tensor) mesh.
    train_jax     ~1.1B LLaMA-class model (MODEL; random weights, fp32 master weights, bf16
                  compute), SFT step at batch 8 x (512 + 512): tokens/s and MFU against the bf16
                  matmul peak measured first in the same process.
    train_torch   the same model in transformers + torch.optim.AdamW (fused, autocast bf16, sdpa
                  attention), eager, then under torch.compile while the part's time lasts.
    sampler_jax   greedy `generate` of the same model (bf16 weights), prompt 512 + 256 new tokens,
                  batch 64 and 256: tokens/s, decode ms per step (prefill timed alone and taken
                  out) and the share of the memory roofline: (weight bytes + live cache bytes) per
                  step / the copy bandwidth measured first in the same process.
    sampler_torch transformers `generate` with its static cache, same model, prompts and batches.
    distill_jax   the PLaD ranking step (4 pairs, so 8 sequences x 1024 tokens) and the KD step
                  (teacher logits from a frozen bf16 teacher of the same size, inside the step).
    demo          `python -m plad_jax.launch --config demo` end to end, shrunk (DEMO_SETTINGS).

MFU counts 6 x params per trained token (LM head on response tokens only, `bench.train_step`)
plus 2 x params per teacher token; attention-score FLOPs are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# name -> (seconds on the device, seconds in the dry run); the device column sums to 450 s.
# The dry run's limits are only a safety net for a slow, shared CI machine (each subprocess
# imports JAX, PyTorch and transformers); its sizes keep it to a few minutes on a quiet one.
PARTS = {
    "correctness": (50, 300),
    "train_jax": (75, 240),
    "train_torch": (70, 240),
    "sampler_jax": (65, 240),
    "sampler_torch": (60, 240),
    "distill_jax": (80, 240),
    "demo": (50, 400),
}
BF16_TOL = 0.03  # bf16 logits: max |ours - fp32 reference| <= 3% of the largest |reference logit|
FP32_TOL = 1e-4

# ~1.1B LLaMA-class (Llama-3.2-1B's shape with a 32k vocabulary, untied head): HF config fields.
MODEL = dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=None,
    pad_token_id=0,
)
TOY = dict(
    MODEL,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
SIZES = {  # device, dry run
    "train": (
        dict(batch=8, prompt=512, response=512, iters=8, warmup=2),
        dict(batch=2, prompt=16, response=16, iters=2, warmup=1),
    ),
    "sampler": (
        dict(batches=(64, 256), prompt=512, new=256, repeats=2, torch_repeats=1),
        dict(batches=(4, 8), prompt=16, new=8, repeats=1, torch_repeats=1),
    ),
    "peak": (dict(matmul=8192, copy_mb=2048), dict(matmul=256, copy_mb=16)),
}
DEMO_SETTINGS = (  # device: the demo shrunk to fit its limit; dry run: two steps a stage
    [
        "sft_teacher.epochs=1",
        "sft_student.epochs=1",
        "distill.epochs=1",
        "data.max_d0=512",
        "data.max_d=128",
        "data.max_validation=32",
        "data.max_test=64",
        "eval.num_examples=64",
        "sft_teacher.validation_examples=32",
    ],
    [
        "sft_teacher.max_steps=2",
        "sft_student.max_steps=2",
        "distill.max_steps=2",
        "data.max_d0=64",
        "data.max_d=16",
        "data.max_validation=8",
        "data.max_test=8",
        "eval.num_examples=8",
        "sft_teacher.validation_examples=8",
        "sample.max_new_tokens=8",
        "eval.max_new_tokens=8",
    ],
)


# -- the parent: one subprocess per part, each under its limit ------------------------------------


def run_part(name: str, args, work: str) -> dict:
    """Run one part in a subprocess (its own process group) writing into `work`; collect its results
    and append its output to `<out>/accelerator.log`."""
    limit = PARTS[name][1 if args.dry_run else 0]
    path = os.path.join(work, f"part-{name}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--out", work]
    cmd += ["--dry-run"] if args.dry_run else []
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
        XLA_PYTHON_CLIENT_PREALLOCATE="false",
        TOKENIZERS_PARALLELISM="false",
    )
    if args.dry_run and name == "correctness":  # exercise the sharded path on 8 CPU devices
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        ).strip()
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=limit)
        status = {0: "ok", 3: "fail"}.get(proc.returncode, "error")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        status = "timeout"
    wall = time.perf_counter() - start
    with open(os.path.join(args.out, "accelerator.log"), "a") as f:
        f.write(f"==== {name}: {status} in {wall:.1f} s (limit {limit} s)\n{log or ''}\n")
    results = {}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
    entry = {"status": status, "limit_s": limit, "wall_s": round(wall, 1), "results": results}
    if status != "ok":
        entry["log_tail"] = (log or "")[-2000:]
    print(f"[{name}] {status} in {wall:.0f} s (limit {limit} s)", flush=True)
    return entry


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=os.path.join("runs", "accelerator"), help="folder for the JSON and logs"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="toy sizes on whatever device is default (CPU)"
    )
    parser.add_argument("--parts", default=",".join(PARTS), help="a subset of " + ",".join(PARTS))
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.part:
        return worker(args.part, args)
    names = [n for n in args.parts.split(",") if n]
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {','.join(PARTS)}")
    start, work = time.perf_counter(), tempfile.mkdtemp(prefix="accelerator-")
    open(os.path.join(args.out, "accelerator.log"), "w").close()
    report = {
        "dry_run": args.dry_run,
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "limits_s": {n: PARTS[n][1 if args.dry_run else 0] for n in names},
        "parts": {},
    }
    for name in names:
        report["parts"][name] = run_part(name, args, work)
        report["wall_s"] = round(time.perf_counter() - start, 1)
        with open(os.path.join(args.out, "accelerator.json"), "w") as f:
            json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table(report) + "\n")
    print(table(report))
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


# -- the table -------------------------------------------------------------------------------------


def _get(report, part, *keys):
    """report["parts"][part]["results"][keys...], or None where anything is missing."""
    node = report["parts"].get(part, {}).get("results", {})
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _num(x, fmt="{:,.0f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else "-"


def _ratio(a, b, fmt="{:.2f}x"):
    return (
        fmt.format(a / b)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
        else "-"
    )


def _peaks(report):
    """The device's bf16 matmul peak and copy bandwidth: the best any part measured."""
    flops = [
        _get(report, p, "bf16_peak_flops") for p in ("train_jax", "train_torch", "distill_jax")
    ]
    copy = [_get(report, p, "copy_bytes_per_s") for p in ("sampler_jax", "sampler_torch")]
    best = lambda xs: max([x for x in xs if isinstance(x, (int, float))], default=None)
    return best(flops), best(copy)


def _correctness_rows(report):
    rows = []
    for family in ("llama_gqa", "t5_v1_1", "gpt_neo"):
        r = _get(report, "correctness", family)
        if not isinstance(r, dict):
            continue
        sharded = ""
        if "sharded_greedy_equal" in r:
            same = "=" if r["sharded_greedy_equal"] else "!="
            sharded = f"; sharded {r['sharded_fp32_max_abs']:.1e}, greedy {same}"
        what = (
            f"{family}: fp32 |d| {r['fp32_max_abs']:.1e}, bf16 |d| {r['bf16_max_abs']:.2g} "
            f"(torch {r['torch_bf16_max_abs']:.2g}, max logit {r['max_abs_logit']:.3g}), greedy "
            f"{'=' if r['greedy_equal'] else '!='} transformers{sharded}"
        )
        rows.append(("correctness", what, "pass" if r["pass"] else "FAIL", "", ""))
    return rows


def _step_rows(report, peak):
    mfu = lambda r: (
        _num(r["flops"] / r["step_s"] / peak, "{:.1%}") if isinstance(r, dict) and peak else "-"
    )
    tok = lambda r: _num(r.get("tok_s")) if isinstance(r, dict) else "-"
    ours, eager, compiled = (
        _get(report, "train_jax", "sft"),
        _get(report, "train_torch", "sft_eager"),
        _get(report, "train_torch", "sft_compiled"),
    )
    best = max(
        [r for r in (eager, compiled) if isinstance(r, dict)],
        key=lambda r: r["tok_s"],
        default=None,
    )
    rows = [
        (
            "train_jax/torch",
            "sft step tok/s (torch: eager / compiled)",
            tok(ours),
            f"{tok(eager)} / {tok(compiled)}",
            _ratio(ours and ours.get("tok_s"), best and best["tok_s"]),
        ),
        (
            "train_jax/torch",
            "sft step MFU (bf16 peak)",
            mfu(ours),
            f"{mfu(eager)} / {mfu(compiled)}",
            "",
        ),
    ]
    for step in ("plad_rank", "kd"):
        r = _get(report, "distill_jax", step)
        rows.append(("distill_jax", f"{step} step tok/s, MFU", f"{tok(r)}, {mfu(r)}", "", ""))
    return rows


def _sampler_rows(report, bandwidth):
    rows = []
    keys = sorted(
        {
            k
            for p in ("sampler_jax", "sampler_torch")
            for k in report["parts"].get(p, {}).get("results", {})
            if k.startswith("batch_")
        },
        key=lambda k: (len(k), k),
    )
    for key in keys:
        ours, theirs = _get(report, "sampler_jax", key), _get(report, "sampler_torch", key)
        ours, theirs = (r if isinstance(r, dict) else None for r in (ours, theirs))
        tok = lambda r: _num(r and r["tok_s"])
        share = lambda r: _num(
            r and bandwidth and r["bytes_per_step"] / bandwidth / (r["decode_ms_per_step"] / 1e3),
            "{:.0%}",
        )
        step = lambda r: _num(r and r["decode_ms_per_step"], "{:.2f}")
        rows.append(
            (
                "sampler",
                f"{key.replace('_', ' ')} tok/s",
                tok(ours),
                tok(theirs),
                _ratio(ours and ours["tok_s"], theirs and theirs["tok_s"]),
            )
        )
        rows.append(
            (
                "sampler",
                f"{key.replace('_', ' ')} decode ms/step, roofline share",
                f"{step(ours)}, {share(ours)}",
                f"{step(theirs)}, {share(theirs)}",
                "",
            )
        )
    return rows


def table(report) -> str:
    """The report as one markdown table (plus a header line of device and measured peaks)."""
    peak, bandwidth = _peaks(report)
    device = _get(report, "train_jax", "device") or _get(report, "correctness", "device") or {}
    torch_device = (_get(report, "train_torch", "device") or {}).get("torch_device", "-")
    dry = " DRY RUN" if report["dry_run"] else ""
    lines = [
        f"plad_jax on {device.get('device_kind', '-')} x{device.get('device_count', '-')} "
        f"(jax {device.get('jax', '-')}; torch on {torch_device}){dry}; "
        f"bf16 matmul peak {_num(peak and peak / 1e12, '{:.3g}')} TFLOP/s, copy "
        f"{_num(bandwidth and bandwidth / 1e12, '{:.3g}')} TB/s (measured in this run); total "
        f"{report.get('wall_s', 0):.0f} s",
        "| part | status | s (limit) | measure | plad_jax | transformers + torch | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, part in report["parts"].items():
        lines.append(
            f"| {name} | {part['status']} | {part['wall_s']:.0f} ({part['limit_s']}) | | | | |"
        )
    body = _correctness_rows(report) + _step_rows(report, peak) + _sampler_rows(report, bandwidth)
    demo = report["parts"].get("demo", {}).get("results", {})
    if demo:
        body.append(
            (
                "demo",
                f"end to end, stages done: {','.join(demo.get('stages_done', [])) or '-'}",
                _num(demo.get("wall_s"), "{:.0f} s"),
                "",
                "",
            )
        )
    lines += [f"| {part} | | | {what} | {a} | {b} | {c} |" for part, what, a, b, c in body]
    return "\n".join(lines)


# -- the workers (one part each, in a subprocess) -------------------------------------------------


class Recorder:
    """Results of one part, rewritten to its JSON file after every measurement (so a part killed
    at its limit still leaves what it measured)."""

    def __init__(self, path):
        self.path, self.data = path, {}

    def put(self, key, value):
        self.data[key] = value
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=float)
        os.replace(tmp, self.path)
        print(f"  {key}: {json.dumps(value, default=float)}", flush=True)


def worker(name: str, args) -> int:
    from bench import accelerator_parts

    accelerator_parts.LIMIT = PARTS[name][1 if args.dry_run else 0]
    rec = Recorder(os.path.join(args.out, f"part-{name}.json"))
    ok = getattr(accelerator_parts, name)(rec, args.dry_run)
    return 0 if ok is not False else 3


if __name__ == "__main__":
    sys.exit(main())

"""The parts of `bench/accelerator.py`, one function each, run in their own subprocess.

Each takes a `Recorder` (results written as they come) and `dry` (toy sizes), and returns False
when a correctness check fails. Sizes, limits and tolerances live in `bench.accelerator`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np

from bench.accelerator import BF16_TOL, DEMO_SETTINGS, FP32_TOL, MODEL, SIZES, TOY

START = time.monotonic()
LIMIT = float("inf")  # this part's limit in seconds, set by `bench.accelerator.worker`
NEW = 32  # greedy parity: new tokens per row (as the sampler tests)
# The sampler tests' T5 draws weights at twice the default scale (initializer_factor 2.0): logits
# near 90, where fp32 rounding alone is ~1e-4 and bf16 is off by half the logit in both libraries.
# The logit checks here use the default scale, as tests/test_t5.py does.
CORRECTNESS_CONFIG = {"t5_v1_1": dict(initializer_factor=1.0)}


def sizes(key: str, dry: bool) -> dict:
    return SIZES[key][1 if dry else 0]


def remaining() -> float:
    """Seconds left of this part's limit (`LIMIT`, set by the worker; the parent kills it there)."""
    return LIMIT - (time.monotonic() - START)


def device_info() -> dict:
    import jax

    d = jax.devices()[0]
    return {
        "platform": d.platform,
        "device_kind": d.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "backend_choices": _choices(),
    }


def _choices() -> dict:
    import dataclasses

    from plad_jax import backend

    return dataclasses.asdict(backend.choices())


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_info() -> dict:
    import torch

    dev = torch_device()
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    return {"torch": torch.__version__, "torch_device": name}


def hf_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "model_type"}


def head_params(config: dict) -> int:
    return config["vocab_size"] * config["hidden_size"]


def step_flops(
    config: dict, params: int, sequences: int, prompt: int, response: int, teacher=False
) -> float:
    """Model FLOPs of one train step: 6 x matmul params per token (LM head: response tokens only,
    input embedding: none), plus 2 x the same per token for a teacher's forward pass."""
    embed = 0 if config["tie_word_embeddings"] else head_params(config)
    body = params - embed - head_params(config)
    forward = 2.0 * sequences * (body * (prompt + response) + head_params(config) * response)
    return forward * (4 if teacher else 3)  # student fwd + bwd = 3 x fwd; + teacher fwd


def summary(timing: dict, tokens: int, flops: float, peak: float) -> dict:
    return {
        **timing,
        "tokens": tokens,
        "tok_s": tokens / timing["step_s"],
        "flops": flops,
        "mfu_own_peak": flops / timing["step_s"] / peak,
    }


# -- peaks (each framework measures its own; the table takes the best per device) -----------------


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def jax_bf16_peak(n: int) -> float:
    """FLOP/s of an n x n x n bf16 matrix product (fp32 accumulation), best of 10."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / best_seconds(lambda: mm(a, b).block_until_ready(), 10)


def jax_copy_bandwidth(megabytes: int) -> float:
    """Bytes/s read + written by an elementwise pass over a bf16 array (x + 1), best of 10."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((megabytes * 2**20 // 2,), jnp.bfloat16)
    step = jax.jit(lambda v: v + jnp.ones((), v.dtype))
    return 2 * x.nbytes / best_seconds(lambda: step(x).block_until_ready(), 10)


def torch_sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def torch_bf16_peak(n: int) -> float:
    import torch

    a = torch.randn(n, n, device=torch_device(), dtype=torch.bfloat16)
    b = torch.randn(n, n, device=torch_device(), dtype=torch.bfloat16)
    return 2 * n**3 / best_seconds(lambda: (torch.mm(a, b), torch_sync()), 10)


def torch_copy_bandwidth(megabytes: int) -> float:
    import torch

    x = torch.zeros(megabytes * 2**20 // 2, device=torch_device(), dtype=torch.bfloat16)
    return 2 * x.numel() * 2 / best_seconds(lambda: (x.clone(), torch_sync()), 10)


# -- (a) correctness -------------------------------------------------------------------------------


def correctness(rec, dry) -> bool:
    import jax
    import torch
    import transformers

    from plad_jax import sharding as shd
    from tests.helpers import FAMILIES

    torch.set_float32_matmul_precision("highest")
    rec.put("device", {**device_info(), **torch_info()})
    rec.put("tolerances", {"fp32_max_abs": FP32_TOL, "bf16_max_abs_over_max_logit": BF16_TOL})
    n = min(jax.device_count(), 8)
    mesh = None
    if n > 1:
        tensor, fsdp = (2 if n % 2 == 0 else 1), (2 if n % 4 == 0 else 1)
        mesh = shd.make_mesh((n // (tensor * fsdp), fsdp, tensor), devices=jax.devices()[:n])
        rec.put("mesh", dict(mesh.shape))
    ok = True
    for name, (config_cls, model_cls, kwargs) in FAMILIES.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(
            **{**kwargs, **CORRECTNESS_CONFIG.get(name, {})}, eos_token_id=None
        )
        model = getattr(transformers, model_cls)(config).eval()
        model.generation_config.eos_token_id = None  # every row runs NEW tokens
        with tempfile.TemporaryDirectory() as path:
            model.save_pretrained(path)
            # dry run: the sharded path once (GQA, heads split over tensor), to keep CI short
            row = family_checks(
                model.to(torch_device()), path, mesh if not dry or name == "llama_gqa" else None
            )
        rec.put(name, row)
        ok = ok and row["pass"]
    return ok


def family_checks(model, path, mesh) -> dict:
    """Logits (fp32, bf16) and greedy parity of one family against its transformers model."""
    import copy

    import jax.numpy as jnp
    import torch

    from plad_jax import backend
    from plad_jax.generation import sampler
    from plad_jax.models import from_pretrained
    from tests.helpers import (
        PROMPT_LENS,
        RESPONSE_LENS,
        VOCAB,
        hf_greedy,
        max_abs_diff_real,
        padded_batch,
        prompt_batch,
        reference_logits,
    )

    batch = padded_batch(0, VOCAB, PROMPT_LENS, RESPONSE_LENS)
    ref = reference_logits(model, *batch)
    scale = float(np.max(np.abs(ref[batch[3].astype(bool)])))
    ids, mask = prompt_batch()
    lm = from_pretrained(path)
    with backend.parity_precision():
        fp32 = max_abs_diff_real(lm.logits(*batch), ref, batch[3])
        ours = sampler.generate(lm, ids, mask, max_new_tokens=NEW, temperature=0.0)
    theirs = hf_greedy(model, ids, mask, NEW)
    row = {
        "fp32_max_abs": fp32,
        "max_abs_logit": scale,
        "greedy_equal": all(list(ours.tokens[b]) == theirs[b] for b in range(len(theirs))),
    }
    bf16_lm = from_pretrained(path, compute_dtype=jnp.bfloat16)
    row["bf16_max_abs"] = max_abs_diff_real(bf16_lm.logits(*batch), ref, batch[3])
    row["torch_bf16_max_abs"] = max_abs_diff_real(
        reference_logits(copy.deepcopy(model).to(torch.bfloat16), *batch), ref, batch[3]
    )
    checks = [fp32 <= FP32_TOL, row["bf16_max_abs"] <= BF16_TOL * scale, row["greedy_equal"]]
    if mesh is not None:
        sharded = from_pretrained(path, mesh=mesh)
        with backend.parity_precision():
            row["sharded_fp32_max_abs"] = max_abs_diff_real(sharded.logits(*batch), ref, batch[3])
            out = sampler.generate(sharded, ids, mask, max_new_tokens=NEW, temperature=0.0)
        row["sharded_greedy_equal"] = bool(np.array_equal(out.tokens, ours.tokens))
        checks += [row["sharded_fp32_max_abs"] <= FP32_TOL, row["sharded_greedy_equal"]]
    row["pass"] = bool(all(checks))
    return row


# -- (b) the train step ----------------------------------------------------------------------------


def train_jax(rec, dry) -> bool:
    import jax.numpy as jnp

    from bench.train_step import jax_step_timing, make_batch
    from plad_jax.models.hf import init_model

    s, config = sizes("train", dry), (TOY if dry else MODEL)
    rec.put("device", device_info())
    peak = jax_bf16_peak(sizes("peak", dry)["matmul"])
    rec.put("bf16_peak_flops", peak)
    # fp32 master weights, bf16 compute
    lm = init_model(config, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    params = lm.num_params()
    rec.put("params", params)
    args = SimpleNamespace(**s)
    timing = jax_step_timing(lm, "sft", make_batch(args, lm.vocab_size), s["iters"], s["warmup"])
    tokens = s["batch"] * (s["prompt"] + s["response"])
    flops = step_flops(config, params, s["batch"], s["prompt"], s["response"])
    rec.put("sft", summary(timing, tokens, flops, peak))


def train_torch(rec, dry) -> bool:
    import torch
    import transformers

    from bench.train_step import token_arrays, torch_step_timing

    s, config = sizes("train", dry), (TOY if dry else MODEL)
    rec.put("device", torch_info())
    peak = torch_bf16_peak(sizes("peak", dry)["matmul"])
    rec.put("bf16_peak_flops", peak)
    torch.manual_seed(0)
    with torch.device(torch_device()):  # fp32 master weights (autocast computes in bf16)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_kwargs(config)))
    params = sum(p.numel() for p in model.parameters())
    rec.put("params", params)
    rec.put("attention", model.config._attn_implementation)
    args, cuda = SimpleNamespace(**s), torch_device() == "cuda"
    arrays = token_arrays(args, config["vocab_size"])
    tokens = s["batch"] * (s["prompt"] + s["response"])
    flops = step_flops(config, params, s["batch"], s["prompt"], s["response"])
    timing = torch_step_timing(
        model, "sft", arrays, s["iters"], s["warmup"], autocast=torch.bfloat16, fused=cuda or None
    )
    rec.put("sft_eager", summary(timing, tokens, flops, peak))
    if remaining() < (
        15 if dry else 45
    ):  # inductor needs ~40 s for this model; keep eager's figure
        rec.put("sft_compiled", f"skipped: {remaining():.0f} s left")
        return
    # dry run: the same torch.compile path (dynamo + AOT autograd) without C++ code generation
    timing = torch_step_timing(
        model,
        "sft",
        arrays,
        s["iters"],
        s["warmup"],
        autocast=torch.bfloat16,
        fused=cuda or None,
        compiled="aot_eager" if dry else True,
    )
    rec.put("sft_compiled", summary(timing, tokens, flops, peak))


# -- (c) the sampler -------------------------------------------------------------------------------


def cache_bytes_per_step(config: dict, batch: int, prompt: int, new: int) -> float:
    """Keys + values (bf16) of the slots live in an average decode step: prompt + new / 2."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_slot = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 2
    return batch * (prompt + new / 2) * per_slot


def weight_bytes_per_step(config: dict, params: int) -> float:
    """bf16 weights a decode step reads: all but the input embedding (only B rows of it)."""
    return 2.0 * (params - (0 if config["tie_word_embeddings"] else head_params(config)))


def decode_row(config, params, batch, s, total_s, prefill_s, bandwidth, compile_s=None) -> dict:
    step_s = (total_s - prefill_s) / (s["new"] - 1)  # the first token comes out of the prefill
    ideal = weight_bytes_per_step(config, params) + cache_bytes_per_step(
        config, batch, s["prompt"], s["new"]
    )
    return {
        "tok_s": batch * s["new"] / total_s,
        "total_s": total_s,
        "prefill_s": prefill_s,
        "decode_ms_per_step": step_s * 1e3,
        "roofline_ms_per_step": ideal / bandwidth * 1e3,
        "roofline_share_own_bw": ideal / bandwidth / step_s,
        "bytes_per_step": ideal,
        "compile_s": compile_s,
    }


def prompts(batch: int, length: int, vocab: int):
    rng = np.random.default_rng(batch)
    return rng.integers(3, vocab, (batch, length)).astype(np.int32), np.ones(
        (batch, length), np.int32
    )


def sampler_prefill_seconds(lm, ids, mask, new, repeats) -> float:
    """The sampler's own prefill program (compiled by the `generate` call before) timed alone."""
    import jax

    from plad_jax.generation import sampler

    model, config = sampler._StaticModel(lm), sampler.SamplingConfig(new, 0.0, 0, 1.0)
    args = sampler._to_device(
        None, ids, mask, np.ones(len(ids), bool), np.arange(len(ids), dtype=np.uint32)
    )
    run = lambda: jax.block_until_ready(
        sampler._prefill_jit(model, config, lm.params, *args, np.uint32(0), None)  # no stop strings
    )
    return best_seconds(run, repeats)


def sampler_jax(rec, dry) -> bool:
    import jax.numpy as jnp

    from plad_jax import backend
    from plad_jax.models.hf import init_model

    s, config = sizes("sampler", dry), (TOY if dry else MODEL)
    rec.put("device", device_info())
    bandwidth = jax_copy_bandwidth(sizes("peak", dry)["copy_mb"])
    rec.put("copy_bytes_per_s", bandwidth)
    lm = init_model(config, dtype=jnp.bfloat16)
    params = lm.num_params()
    rec.put("params", params)
    for batch in s["batches"]:
        rec.put(f"batch_{batch}", measure_generate(lm, config, params, batch, s, bandwidth))
    if remaining() < (20 if dry else 30):
        rec.put(f"batch_{s['batches'][0]}_cpu_choices", f"skipped: {remaining():.0f} s left")
        return
    # The CPU's cache layout and prefix switch at the first batch, to check this backend's choice.
    cpu, batch = backend.defaults("cpu"), s["batches"][0]
    choices = dict(
        gqa_keys_slots_minor=cpu.gqa_keys_slots_minor, cache_prefix_switch=cpu.cache_prefix_switch
    )
    with backend.override(**choices):
        row = measure_generate(lm, config, params, batch, s, bandwidth)
    rec.put(f"batch_{batch}_cpu_choices", row)


def measure_generate(lm, config, params, batch, s, bandwidth) -> dict:
    from bench.sampler import ours

    ids, mask = prompts(batch, s["prompt"], config["vocab_size"])
    t0 = time.perf_counter()
    ours(lm, ids, mask, s["new"])
    first = time.perf_counter() - t0
    total = min(ours(lm, ids, mask, s["new"]) for _ in range(s["repeats"]))
    prefill = sampler_prefill_seconds(lm, ids, mask, s["new"], s["repeats"])
    return decode_row(config, params, batch, s, total, prefill, bandwidth, compile_s=first - total)


def sampler_torch(rec, dry) -> bool:
    import torch
    import transformers

    from bench.sampler import theirs

    s, config = sizes("sampler", dry), (TOY if dry else MODEL)
    rec.put("device", torch_info())
    bandwidth = torch_copy_bandwidth(sizes("peak", dry)["copy_mb"])
    rec.put("copy_bytes_per_s", bandwidth)
    torch.manual_seed(0)
    with torch.device(torch_device()):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_kwargs(config))).to(
            torch.bfloat16
        )
    model.eval().generation_config.eos_token_id = None
    params = sum(p.numel() for p in model.parameters())
    rec.put("params", params)
    static = dict(cache_implementation="static")
    for batch in s["batches"]:
        ids, mask = prompts(batch, s["prompt"], config["vocab_size"])
        theirs(model, ids[:2], mask[:2], 2, **static)  # warm-up
        total = min(theirs(model, ids, mask, s["new"], **static) for _ in range(s["torch_repeats"]))
        prefill = min(theirs(model, ids, mask, 1, **static) for _ in range(s["torch_repeats"]))
        rec.put(f"batch_{batch}", decode_row(config, params, batch, s, total, prefill, bandwidth))


# -- (d) the distillation steps and the demo -------------------------------------------------------


def distill_jax(rec, dry) -> bool:
    import jax.numpy as jnp

    from bench.train_step import jax_step_timing, make_batch
    from plad_jax.models.hf import init_model

    s, config = sizes("train", dry), (TOY if dry else MODEL)
    rec.put("device", device_info())
    peak = jax_bf16_peak(sizes("peak", dry)["matmul"])
    rec.put("bf16_peak_flops", peak)
    lm = init_model(config, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    params, length = lm.num_params(), s["prompt"] + s["response"]
    pairs = SimpleNamespace(**dict(s, batch=s["batch"] // 2))  # y+ and y- of B/2 pairs: B sequences
    timing = jax_step_timing(
        lm, "plad_rank", make_batch(pairs, lm.vocab_size, "plad_rank"), s["iters"], s["warmup"]
    )
    flops = step_flops(config, params, s["batch"], s["prompt"], s["response"])
    rec.put("plad_rank", summary(timing, s["batch"] * length, flops, peak))
    teacher = init_model(config, seed=1, dtype=jnp.bfloat16)
    args = SimpleNamespace(**s)
    timing = jax_step_timing(
        lm, "kd", make_batch(args, lm.vocab_size), s["iters"], s["warmup"], teacher=teacher
    )
    flops = step_flops(config, params, s["batch"], s["prompt"], s["response"], teacher=True)
    rec.put("kd", summary(timing, s["batch"] * length, flops, peak))


def demo(rec, dry) -> bool:
    """The demo preset through the CLI, shrunk by DEMO_SETTINGS, killed just before the limit."""
    settings = DEMO_SETTINGS[1 if dry else 0]
    rec.put("settings", settings)
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "plad_jax.launch", "--config", "demo", "--run-dir", run_dir]
        cmd += [x for item in settings for x in ("--set", item)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=max(remaining() - 3, 1)
            )
            code, log = proc.returncode, proc.stderr + proc.stdout
        except subprocess.TimeoutExpired as e:
            code, log = (
                "timeout",
                (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or ""),
            )
        rec.put(
            "stages_done",
            sorted(
                d for d in os.listdir(run_dir) if os.path.isfile(os.path.join(run_dir, d, "DONE"))
            ),
        )
        rec.put("stage_log", [line[:160] for line in log.splitlines() if "stage " in line][-12:])
        rec.put("wall_s", time.perf_counter() - t0)
        rec.put("exit", code)
        if code != 0:
            print(log[-3000:], file=sys.stderr)
            return False

"""Multi-host for real: 2 processes on localhost (4 CPU devices each, `jax.distributed`, gloo
collectives) run the sharded SFT train step, each feeding only its own batch rows, and get the
losses of the 1-process 8-device run; then the sampler, each process passing only its own prompts,
and get the 1-process samples of those prompts (`tests/multihost_worker.py` holds the shared code
path)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
import transformers

from plad_jax import sharding as shd
from tests import multihost_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
TIMEOUT_S = 120  # the whole 2-process job, start to exit; a hang is killed and fails the test


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=worker.VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    path = str(tmp_path_factory.mktemp("llama"))
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(model_dir: str) -> list[subprocess.Popen]:
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
    )
    port = free_loopback_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.multihost_worker",
                "--process-id",
                str(i),
                "--num-processes",
                str(NUM_PROCESSES),
                "--port",
                str(port),
                "--model-dir",
                model_dir,
                "--timeout",
                str(TIMEOUT_S),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for i in range(NUM_PROCESSES)
    ]
    return procs


def kill(procs: list[subprocess.Popen]):
    for proc in procs:  # each worker leads its own process group (start_new_session)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def wait_for(procs: list[subprocess.Popen], started: float) -> list[dict]:
    """Wait until TIMEOUT_S after `started`; each worker's JSON, or a clear failure (hangs are
    killed)."""
    deadline, outputs, timed_out = started + TIMEOUT_S, [], False
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out:
        kill(procs)
        tails = [proc.communicate()[1][-2000:] for proc in procs]
        pytest.fail(
            f"the {NUM_PROCESSES}-process job did not finish within {TIMEOUT_S} s; killed. "
            + " | ".join(f"process {i} stderr: {t}" for i, t in enumerate(tails))
        )
    for i, (proc, (_, err)) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            pytest.fail(f"process {i} exited with {proc.returncode}; stderr tail:\n{err[-3000:]}")
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


@pytest.fixture(scope="module")
def two_process_run(model_dir):
    """(each worker's JSON, the 1-process reference: its sft runs and its samples)."""
    assert jax.process_count() == 1 and jax.device_count() == 8
    started, procs = time.monotonic(), start_processes(model_dir)
    try:  # the 1-process reference runs while the workers start up and compile
        reference = {
            worker.mesh_name(shape): worker.sft_run(
                model_dir, shape, eager_logits=shape == worker.MESHES[0]
            )
            for shape in worker.MESHES
        }
        samples = worker.sample_run(model_dir)
    except BaseException:
        kill(procs)
        raise
    return wait_for(procs, started), reference, samples


def test_two_processes_give_the_one_process_losses(two_process_run):
    results, reference, _ = two_process_run
    assert [r["process"] for r in results] == list(range(NUM_PROCESSES))
    for r in results:
        assert (r["devices"], r["local_devices"]) == (8, 4)
        for mesh, ref in reference.items():
            got = r["runs"][mesh]
            # each process fed only its half of the batch ...
            half = worker.ROWS // NUM_PROCESSES
            assert got["rows"] == [r["process"] * half, (r["process"] + 1) * half], mesh
            # ... and every process sees the global losses of the 1-process 8-device run
            np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5, err_msg=mesh)
            np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-5, err_msg=mesh)
            if "logits_abs_sum" in ref:
                np.testing.assert_allclose(
                    got["logits_abs_sum"], ref["logits_abs_sum"], rtol=1e-5, err_msg=mesh
                )
    assert "logits_abs_sum" in results[0]["runs"][worker.mesh_name(worker.MESHES[0])]
    assert ref["rows"] == [0, worker.ROWS]
    assert len(set(np.round(ref["loss"], 6))) == worker.STEPS  # the steps really changed the model


def test_two_processes_sample_their_own_prompts_as_one_process_does(two_process_run):
    results, _, ref = two_process_run
    assert ref["rows"] == list(range(worker.ROWS)) and ref["many_prompts"] == list(
        range(worker.ROWS)
    )
    covered = []
    for r in results:
        got, rows = r["samples"], r["samples"]["rows"]
        covered += rows
        # generate: this process's rows of the global batch, greedy and sampled (2 per prompt) ...
        assert got["greedy"] == [ref["greedy"][i] for i in rows]
        np.testing.assert_allclose(
            got["greedy_logprobs"], [ref["greedy_logprobs"][i] for i in rows], atol=1e-5
        )
        assert got["sampled"] == [ref["sampled"][2 * i + s] for i in rows for s in range(2)]
        # ... and generate_many on an uneven share of the prompts (3 batches vs 2, agreed on)
        assert got["many"] == [ref["many"][i] for i in got["many_prompts"]]
        np.testing.assert_allclose(
            got["many_logprob"], [ref["many_logprob"][i] for i in got["many_prompts"]], atol=1e-5
        )
    assert sorted(covered) == list(range(worker.ROWS))
    assert [len(r["samples"]["many_prompts"]) for r in results] == [
        worker.MANY_SPLIT,
        worker.ROWS - worker.MANY_SPLIT,
    ]
    assert len({tuple(t) for t in ref["sampled"]}) > 1  # the samples are not all one sequence


def test_process_batch_rows_single_process():
    mesh = shd.make_mesh((2, 2, 2))
    assert shd.process_batch_rows(mesh, 8) == slice(0, 8)
    assert shd.local_batch_shards(mesh) == range(4)
    with pytest.raises(ValueError, match="cannot be split over data\\*fsdp = 4"):
        shd.process_batch_rows(mesh, 6)


def test_global_batch_and_place_batch_equal_shard_batch_in_one_process():
    """A typed batch keeps its type through placement, each array where `shard_batch` puts it."""
    mesh = shd.make_mesh((2, 2, 2))
    batch = worker.global_sft_batch(0)
    for placed in (
        shd.global_batch(mesh, batch),
        shd.place_batch(mesh, batch),
        shd.place_batch(mesh, batch, local=True),
    ):
        assert type(placed) is type(batch) and placed.example_index is None
        for got, array in zip(jax.tree.leaves(placed), jax.tree.leaves(batch), strict=True):
            (expected,) = shd.shard_batch(mesh, array)
            assert got.sharding == expected.sharding
            np.testing.assert_array_equal(np.asarray(got), array)
    assert shd.local_rows(mesh, batch) is batch

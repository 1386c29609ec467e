"""The command line: resolve a config, record it in the run directory, run the stages.

    python -m plad_jax.launch [--config NAME|PATH] [--set a.b=value ...] [--stages s1,s2]
        [--run-dir DIR]

--config    a preset in configs/ (default: demo), or a .py file with config() or a .json file
            (a run's config.json reruns that run)
--set       override one leaf, type-checked (repeatable): --set distill.method=plad_margin
--stages    a subset of sft_teacher,sft_student,sample,distill,eval (default: all, in that order)
--run-dir   where the run lives (default: runs/<name>); local path or gs://

Exit status: 0 on success; 2 with one line on stderr for anything the user can fix (flag, key,
value, contradiction, missing model or data, a `fetch:NAME` checkpoint not fetched yet, unwritable
run directory: `plad_jax.config.UserError`, `plad_jax.models.CheckpointError`,
`plad_jax.data.DataError`); 130 on Ctrl-C; anything else is a bug and keeps its traceback.

Every host of a multi-host job runs the same command: `jax.distributed.initialize()` comes first
when there are several processes (Cloud TPU VMs, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID, or a multi-task SLURM job; PLAD_JAX_DISTRIBUTED=0/1 turns detection off/on), and
only process 0 writes config.json.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
import urllib.parse

PROG = "plad_jax.launch"


class UsageError(Exception):
    """A bad command line or launch environment; the message is one line. (Raised before the
    config module, and so JAX, is imported.)"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message and exits; we want one line
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=f"python -m {PROG}",
        description="Distil a teacher LLM into a student (PLaD and baselines).",
    )
    parser.add_argument(
        "--config",
        default="demo",
        metavar="NAME|PATH",
        help="preset name in configs/ (default: demo) or a .py/.json config file",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override a config leaf, e.g. distill.beta=0.5 (repeatable)",
    )
    parser.add_argument(
        "--stages",
        default=None,
        metavar="S1,S2",
        help="stages to run: sft_teacher,sft_student,sample,distill,eval (default: all)",
    )
    parser.add_argument(
        "--run-dir", default=None, metavar="DIR", help="run directory (default: runs/<name>)"
    )
    return parser


# ----------------------------------------------------------------------------------------------
# Multi-host


def distributed_kwargs(environ=os.environ, on_cloud_tpu: bool | None = None) -> dict | None:
    """Arguments for `jax.distributed.initialize`, or None when this is a single-process run.

    Explicit: JAX_COORDINATOR_ADDRESS (host:port of process 0) with JAX_NUM_PROCESSES and
    JAX_PROCESS_ID. Automatic: Cloud TPU VMs and multi-task SLURM jobs, where JAX finds the rest.
    PLAD_JAX_DISTRIBUTED=0 never initializes (e.g. one process in a container on a TPU VM);
    PLAD_JAX_DISTRIBUTED=1 always does (JAX's cluster detection finds the coordinator).
    """
    switch = environ.get("PLAD_JAX_DISTRIBUTED", "").strip().lower()
    if switch in ("0", "false", "off", "no"):
        return None
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = {"coordinator_address": environ["JAX_COORDINATOR_ADDRESS"]}
        for name, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
            if environ.get(name) is not None:
                kwargs[key] = _env_int(environ, name)
        return kwargs
    if switch in ("1", "true", "on", "yes"):
        return {}
    if on_cloud_tpu is None:
        on_cloud_tpu = _on_cloud_tpu_vm()
    if on_cloud_tpu:
        return {}
    if (
        environ.get("SLURM_JOB_ID")
        and environ.get("SLURM_NTASKS")
        and _env_int(environ, "SLURM_NTASKS") > 1
    ):
        return {}
    return None


def _env_int(environ, name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise UsageError(
            f"environment variable {name} must be an integer, got {environ[name]!r}"
        ) from None


def _on_cloud_tpu_vm() -> bool:
    """libtpu installed and TPU chips on the PCI bus (JAX's own test, without starting a
    backend)."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    # a private helper that may move: fall back to the device files
    except Exception:  # noqa: BLE001
        return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize_distributed() -> bool:
    """`jax.distributed.initialize()` when there are several processes; True if it was called.
    Must come before any other JAX call."""
    kwargs = distributed_kwargs()
    if kwargs is None:
        return False
    import jax

    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        raise UsageError(
            f"jax.distributed.initialize() failed ({' '.join(str(e).split())}); on a multi-host "
            "job set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID"
        ) from None
    return True


# ----------------------------------------------------------------------------------------------
# Hugging Face hub


def hub_reachable(environ=os.environ, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint (HF_ENDPOINT, default huggingface.co) opens."""
    url = urllib.parse.urlparse(environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def prefer_local_files(environ=os.environ) -> bool:
    """Set HF_HUB_OFFLINE=1 when the hub cannot be reached, so that every hub lookup (models,
    tokenizers, datasets) answers from the local cache at once instead of retrying for minutes.
    Must run before huggingface_hub is imported; returns True when it switched to offline."""
    if (
        environ.get("HF_HUB_OFFLINE")
        or environ.get("HF_DATASETS_OFFLINE")
        or hub_reachable(environ)
    ):
        return False
    environ["HF_HUB_OFFLINE"] = "1"
    return True


# ----------------------------------------------------------------------------------------------
# Run directory


def write_run_config(config, run_dir: str) -> str | None:
    """Write `run_dir/config.json` atomically. An earlier, different config.json is kept as
    config.<UTC time>.json; returns a warning line saying so (None otherwise)."""
    from plad_jax.config import UserError, changed_keys, to_dict

    data = to_dict(config)
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    if "://" in run_dir:
        return _write_remote(run_dir, text, data)
    path = os.path.join(run_dir, "config.json")
    warning, tmp = None, None
    try:
        os.makedirs(run_dir, exist_ok=True)
        old = _read_json(path)
        if old == data:
            return None
        # New file first, then keep the old one aside, then swap: a failure at any point leaves
        # every earlier config.json where it was.
        fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".json.tmp", dir=run_dir)
        os.fchmod(
            fd, 0o666 & ~_umask()
        )  # mkstemp makes it 0600; the run's other files follow the umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if old is not None:
            kept = os.path.join(run_dir, f"config.{_stamp()}.json")
            shutil.copyfile(path, kept)
            warning = _changed_warning(
                path, kept, changed_keys(old, data) if isinstance(old, dict) else []
            )
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        where = e.filename or run_dir
        raise UserError(
            f"cannot write the run directory {run_dir} ({where}: {e.strerror or e}); "
            "pass a writable --run-dir"
        ) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return warning


def check_run_dir(run_dir: str):
    """UserError unless `run_dir` exists and is writable or can be created (local paths; a
    `gs://` run directory is checked when config.json is written)."""
    from plad_jax.config import UserError

    if "://" in run_dir:
        return
    existing = os.path.abspath(run_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(
            f"cannot write the run directory {run_dir} ({existing} is a file); pass a writable "
            "--run-dir"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(
            f"cannot write the run directory {run_dir} ({existing}: permission denied); "
            "pass a writable --run-dir"
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stamp() -> str:
    # UP017 (3.10)
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")  # noqa: UP017


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "unreadable"  # differs from anything; kept aside, never lost


def _changed_warning(path, kept, keys) -> str:
    what = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "") if keys else "its contents"
    return (
        f"warning: {path} from an earlier run differed in {what}; kept it as "
        f"{os.path.basename(kept)}. Stages already DONE in this run directory are not rerun; use "
        "a new --run-dir or name to start afresh."
    )


def _write_remote(run_dir: str, text: str, data: dict) -> str | None:
    from etils import epath

    from plad_jax.config import UserError, changed_keys

    try:
        directory = epath.Path(run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "config.json"
        warning = None
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except ValueError:
                old = "unreadable"
            if old == data:
                return None
            kept = directory / f"config.{_stamp()}.json"
            path.copy(kept)
            warning = _changed_warning(
                str(path), str(kept), changed_keys(old, data) if isinstance(old, dict) else []
            )
        path.write_text(text)  # one object write: atomic on GCS
        return warning
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot write the run directory {run_dir} ({type(e).__name__}: "
            f"{' '.join(str(e).split())}); pass a writable --run-dir"
        ) from None


# ----------------------------------------------------------------------------------------------
# Main


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _fail(message: str, code: int = 2) -> int:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    try:
        return _run(build_parser().parse_args(argv))
    except UsageError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted; rerun the same command to resume from the last finished stage "
            "or checkpoint",
            file=sys.stderr,
        )
        return 130
    except Exception as e:  # only user errors end here quietly; anything else is a bug: traceback
        if _is_user_error(e):
            return _fail(str(e))
        raise


def _is_user_error(e: Exception) -> bool:
    """Errors whose one-line message is the whole story: config, model checkpoint, data."""
    from plad_jax.config import UserError
    from plad_jax.data import DataError
    from plad_jax.models import CheckpointError

    return isinstance(e, (UserError, CheckpointError, DataError))


def _run(args) -> int:
    distributed = initialize_distributed()  # before anything touches a JAX backend
    prefer_local_files()  # before anything imports huggingface_hub

    from plad_jax import config as cfg

    stages = cfg.parse_stages(args.stages)
    config = cfg.resolve(args.config, args.overrides, run_dir=args.run_dir)
    from plad_jax import fetch, methods

    methods.configure(config)  # the method and its hyper-parameters, before anything is written
    # config.json keeps `fetch:NAME` (no machine's path in it); the stages get the cached files.
    local = fetch.resolve_config(config)
    run_dir = config.run_dir
    check_run_dir(run_dir)

    def record_config():  # once the inputs are known to be there: a failed start changes nothing
        logging.getLogger("plad_jax").info("run directory %s", run_dir)
        if _process_index(distributed) == 0:
            warning = write_run_config(config, run_dir)
            if warning:
                print(f"{PROG}: {warning}", file=sys.stderr)

    import logging

    # Our progress at INFO on process 0; the libraries (absl/Orbax, JAX, the hub) only at WARNING.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("plad_jax").setLevel(
        logging.INFO if _process_index(distributed) == 0 else logging.WARNING
    )
    from plad_jax.pipeline import runner as pipeline
    from plad_jax.training.step import NonFiniteLossError

    try:
        pipeline.run(local, run_dir, stages, on_start=record_config)
    except NonFiniteLossError as e:  # a diverged run: the message names the last good checkpoint
        return _fail(str(e), code=1)
    return 0


def _process_index(distributed: bool) -> int:
    if not distributed:
        return 0  # no need to start a backend just to learn this
    import jax

    return jax.process_index()


if __name__ == "__main__":
    sys.exit(main())

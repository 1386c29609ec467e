"""The wheels a lent accelerator machine lacks for plad_jax, fetched here, ready to carry there.

    python -m bench.device_wheels             # list what is missing and download it into .whl/
    python -m bench.device_wheels --list      # list only

The device machine has no network: whatever plad_jax needs beyond its image must travel with the
working tree as wheels (at most 64 MiB with the tree). This compares plad_jax's install
requirements (`CORE` in setup.py) and, transitively, their own requirements (read from the
packages installed here) with the image's package list, and downloads the missing ones at the
versions installed and tested here, for the device's CPython 3.12 on x86-64 (`pip download
--no-deps --only-binary=:all:`; a package published only as a source archive is built into a
pure-Python wheel with `pip wheel --no-deps`). Last it prints the size and the `device` call that
installs them and runs `bench/accelerator.py` (see the README's Benchmarks).

The image list is the `Python packages already there` section of the device entry's KINDS.md
(`--kinds`); without that file, IMAGE below (the same list, read 2026-11-17) is used.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = "/work/.library/device/KINDS.md"
DEST = ".whl"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
IMAGE = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator
lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py
mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja
numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-
runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-
cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-
cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-
mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich
sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-
lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
RUN_COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "
    "/tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 "
    "bench/accelerator.py --out $OUT"
)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(kinds: str) -> set[str]:
    """Names in the device image: KINDS.md's 'Packages:' line if readable, else IMAGE."""
    if os.path.exists(kinds):
        with open(kinds) as f:
            for line in f:
                if line.startswith("nvidia-h200:") and "Packages:" in line:
                    return {
                        normalize(n)
                        for n in line.split("Packages:", 1)[1].strip(" .\n").split(", ")
                    }
    return {normalize(n) for n in IMAGE.split()}


def core_requirements() -> list[str]:
    """Distribution names in setup.py's CORE list (read with ast: setup.py calls setup())."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "CORE" for t in node.targets
        ):
            return [
                re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0] for req in ast.literal_eval(node.value)
            ]
    raise SystemExit("setup.py has no CORE list")


def requirements_of(name: str) -> list[str]:
    """Unconditional requirements of an installed distribution (extras and markers skipped)."""
    out = []
    for req in md.requires(name) or []:
        if ";" in req and "extra" in req.split(";", 1)[1]:
            continue
        out.append(re.split(r"[<>=!~;\[ (]", req, maxsplit=1)[0])
    return out


def missing(image: set[str]) -> dict[str, str]:
    """{name: installed version} for every requirement, transitively, that the image lacks."""
    todo, seen, need = core_requirements(), set(), {}
    while todo:
        name = normalize(todo.pop())
        if name in seen or name in image:
            continue
        seen.add(name)
        try:
            need[name] = md.version(name)
        except md.PackageNotFoundError:
            raise SystemExit(
                f"{name} is required but not installed here; pip install it first"
            ) from None
        todo += requirements_of(name)
    return need


def download(name: str, version: str, dest: str) -> None:
    """The wheel for the device's Python, or a wheel built here for a source-only release."""
    pip = [sys.executable, "-m", "pip", "-q"]
    spec = f"{name}=={version}"
    flags = [
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
    ]
    flags += [x for p in PLATFORMS for x in ("--platform", p)]
    if subprocess.run(pip + ["download", *flags, "-d", dest, spec]).returncode == 0:
        return
    print(f"{spec}: no wheel published; building a pure-Python one here")
    subprocess.run(pip + ["wheel", "--no-deps", "-w", dest, spec], check=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kinds", default=KINDS, help="the device entry's KINDS.md (its package list)"
    )
    parser.add_argument(
        "--dest", default=os.path.join(ROOT, DEST), help="folder for the wheels (git-ignored)"
    )
    parser.add_argument(
        "--list", action="store_true", help="list the missing packages, download nothing"
    )
    args = parser.parse_args(argv)
    need = missing(image_packages(args.kinds))
    print(
        "missing from the device image: "
        + (", ".join(f"{n}=={v}" for n, v in sorted(need.items())) or "none")
    )
    if args.list:
        return
    os.makedirs(args.dest, exist_ok=True)
    for name, version in sorted(need.items()):
        if not any(
            normalize(f).startswith(normalize(f"{name}-{version}")) for f in os.listdir(args.dest)
        ):
            download(name, version, args.dest)
    files = sorted(os.listdir(args.dest))
    size = sum(os.path.getsize(os.path.join(args.dest, f)) for f in files)
    print(
        f"{len(files)} wheels in {args.dest}: {size / 2**20:.1f} MiB "
        "(carry limit: 64 MiB with the tree)"
    )
    print(f'device call: run(command="{RUN_COMMAND}", carry=[".whl"], timeout_s=540)')


if __name__ == "__main__":
    main()

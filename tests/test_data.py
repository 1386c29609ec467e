"""plad_jax.data: tasks on small files written here, splits, encoding, batching, demo task and
tokenizer."""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from plad_jax.data import (
    DataError,
    DataPosition,
    EncodedExamples,
    Example,
    GameBatch,
    PairBatch,
    SequenceBatch,
    batches,
    bucket_length,
    build_demo_tokenizer,
    demo,
    demo_tokenizer_texts,
    docstring_examples,
    encode_examples,
    encode_texts,
    epoch_order,
    host_shard,
    iterate_batches,
    join_parts,
    load_splits,
    load_task,
    make_batch,
    split_examples,
    split_hh_transcript,
    tf_pipeline,
)


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


# ---------------------------------------------------------------------------------------- tasks


def test_tldr_prompt_completion_layout(tmp_path):
    rows = [
        {"prompt": "SUBREDDIT: r/a\n\nTITLE: t\n\nPOST: p\n\nTL;DR:", "completion": " short"},
        {"prompt": "SUBREDDIT: r/b\n\nTITLE: u\n\nPOST: q\n\nTL;DR:", "completion": " other"},
    ]
    splits = load_task("tldr", write_jsonl(tmp_path / "tldr.jsonl", rows))
    assert list(splits) == ["train"]
    assert splits["train"] == [Example(r["prompt"], r["completion"]) for r in rows]


def test_tldr_openai_jsonl_folder(tmp_path):
    def row(i):
        return {
            "id": f"t{i}",
            "subreddit": "relationships",
            "title": f"Title {i}",
            "post": f"My post {i}.",
            "summary": f"sum {i}",
        }

    for name, ids in (("train", range(4)), ("valid", [10]), ("test", [20, 21])):
        write_jsonl(tmp_path / f"{name}.jsonl", [row(i) for i in ids])
    splits = load_task("tldr", str(tmp_path))
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "validation": 1, "test": 2}
    # trl-lib/tldr's text: examples/datasets/tldr.py in huggingface/trl
    assert splits["test"][1] == Example(
        "SUBREDDIT: r/relationships\n\nTITLE: Title 21\n\nPOST: My post 21.\n\nTL;DR:", " sum 21"
    )


def test_hub_style_parquet_shards_are_concatenated_in_order(tmp_path):
    write_parquet(
        tmp_path / "data" / "train-00001-of-00002.parquet", [{"prompt": "c", "completion": " 3"}]
    )
    write_parquet(
        tmp_path / "data" / "train-00000-of-00002.parquet",
        [{"prompt": "a", "completion": " 1"}, {"prompt": "b", "completion": " 2"}],
    )
    write_parquet(
        tmp_path / "data" / "test-00000-of-00001.parquet", [{"prompt": "z", "completion": " 9"}]
    )
    splits = load_task("tldr", str(tmp_path))
    assert [e.prompt for e in splits["train"]] == ["a", "b", "c"]
    assert splits["test"] == [Example("z", " 9")]


def test_hh_transcripts_split_after_the_last_assistant_turn(tmp_path):
    chosen = (
        "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: It is 6."
        "\n\nHuman: Thanks!\n\nAssistant: You're welcome."
    )
    rows = [
        {"chosen": chosen, "rejected": "\n\nHuman: x\n\nAssistant: no"},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there.", "rejected": "-"},
    ]
    splits = load_task("hh", write_jsonl(tmp_path / "hh" / "train.jsonl", rows))
    first, second = splits["train"]
    assert first.prompt == (
        "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: It is 6."
        "\n\nHuman: Thanks!\n\nAssistant:"
    )
    assert first.response == " You're welcome."
    assert second == Example("\n\nHuman: Hi\n\nAssistant:", " Hello there.")
    assert split_hh_transcript("\n\nHuman: a\n\nAssistant:") == Example(
        "\n\nHuman: a\n\nAssistant:", ""
    )


@pytest.mark.parametrize("task", ["jsonl", "csv", "parquet"])
def test_file_tasks_with_custom_fields(tmp_path, task):
    rows = [
        {"question": "Why is the sky blue?", "answer": "Rayleigh scattering.", "id": "1"},
        {"question": "2+2?", "answer": "4", "id": "2"},
    ]
    writer = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}[task]
    path = writer(tmp_path / f"qa.{task}", rows)
    splits = load_task(task, path, prompt_field="question", response_field="answer")
    assert splits["train"] == [
        Example("Why is the sky blue?", "Rayleigh scattering."),
        Example("2+2?", "4"),
    ]
    prompts_only = load_task(task, path, prompt_field="question", response_field="")
    assert prompts_only["train"] == [Example("Why is the sky blue?", ""), Example("2+2?", "")]


def test_file_task_folder_and_default_fields(tmp_path):
    write_jsonl(
        tmp_path / "train.jsonl",
        [{"prompt": "p1", "response": "r1"}, {"prompt": "  ", "response": "x"}],
    )
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "p2", "response": "r2"}])
    splits = load_task("jsonl", str(tmp_path))
    assert splits == {
        "train": [Example("p1", "r1")],
        "test": [Example("p2", "r2")],
    }  # blank prompt dropped


# ---------------------------------------------------------------------------------------- bad input


def one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_input_errors_are_one_line_and_name_the_thing(tmp_path, monkeypatch):
    one_line_error(r"does not exist", load_task, "jsonl", str(tmp_path / "missing.jsonl"))
    one_line_error(r"does not exist", load_task, "tldr", str(tmp_path / "nope" / "train.parquet"))
    one_line_error(r"data\.path", load_task, "csv")
    one_line_error(
        r"unknown task 'sumarize'.*tldr, hh, jsonl, csv, parquet, demo", load_task, "sumarize"
    )

    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    message = one_line_error(r"no field 'prompt'", load_task, "jsonl", qa)
    assert "'question', 'answer'" in message
    one_line_error(
        r"no field 'reply'.*'question', 'answer'",
        load_task,
        "jsonl",
        qa,
        prompt_field="question",
        response_field="reply",
    )
    one_line_error(r"no field 'chosen'", load_task, "hh", qa)
    one_line_error(
        r"row 1: the transcript has no 'Assistant:' turn",
        load_task,
        "hh",
        write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: only a question"}]),
    )
    one_line_error(
        r"row 1: field 'prompt' holds int, not text",
        load_task,
        "jsonl",
        write_jsonl(tmp_path / "num.jsonl", [{"prompt": 3, "response": "x"}]),
    )
    one_line_error(r"'prompt' and 'completion'.*'subreddit'", load_task, "tldr", qa)
    one_line_error(
        r"no field 'prompt'",
        load_task,
        "parquet",
        write_parquet(tmp_path / "qa.parquet", [{"q": "x"}]),
    )
    one_line_error(
        r"no field 'prompt'", load_task, "csv", write_csv(tmp_path / "qa.csv", [{"q": "x"}])
    )
    one_line_error(
        r"row 2 has no value for field 'response'",
        load_task,
        "jsonl",
        write_jsonl(tmp_path / "gap.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c"}]),
    )
    one_line_error(
        r"row 2: not valid JSON: Expecting property name enclosed in double quotes: "
        r"line 2 column 2 \(char 1 of the line, byte offset 10 in the file\)",
        load_task,
        "jsonl",
        str(_write(tmp_path / "bad.jsonl", '{"a": 1}\n{oops\n')),
    )

    empty = _write(tmp_path / "empty.jsonl", "")
    one_line_error(r"empty\.jsonl has no examples", load_task, "jsonl", str(empty))
    one_line_error(
        r"has no examples",
        load_task,
        "jsonl",
        write_jsonl(tmp_path / "blank.jsonl", [{"prompt": " "}]),
        response_field="",
    )
    (tmp_path / "no_splits").mkdir()
    one_line_error(
        r"no_splits has no split files", load_task, "parquet", str(tmp_path / "no_splits")
    )
    one_line_error(r"too few to halve", split_examples, {"train": [Example("a")]})

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'trl-lib/tldr' on the Hub (LocalEntryNotFoundError)\nmore detail"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = one_line_error(r"could not load dataset 'trl-lib/tldr'", load_task, "tldr")
    assert "--set data.path=" in message


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _write_bytes(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


# Each case: (task, file name, bytes, what the one-line error must say). Offsets counted by hand: a
# two-byte character (E_ACUTE) before the bad spot makes byte offsets and columns differ.
ROW, E_ACUTE = b'{"prompt": "a", "response": "b"}\n', "\u00e9".encode()  # 33 bytes, 2 bytes
CUT_ROW = ROW[:-3] + b"}\n"  # the response's closing quote is missing
MULTILINE_CSV = b'prompt,response\n"two\nlines",x\n' + E_ACUTE + b"t\xe9,y\n"
BAD_BYTES = {
    "jsonl_latin1": (
        "jsonl",
        "latin1.jsonl",
        ROW + b'\n{"prompt": "caf\xe9", "response": "b"}\n',
        r"latin1\.jsonl: row 2: byte 0xe9 is not UTF-8 \(invalid continuation byte\): "
        r"line 3 column 16 \(byte offset 49 in the file\); save the file as UTF-8",
    ),
    "csv_multiline_row": (
        "csv",
        "latin1.csv",
        MULTILINE_CSV,
        r"latin1\.csv: row 2: byte 0xe9 is not UTF-8 .*: line 4 column 3 "
        r"\(byte offset 33 in the file\)",
    ),
    "csv_header": (
        "csv",
        "header.csv",
        b"pro\xffmpt,response\nok,x\n",
        r"header\.csv: the header: byte 0xff is not UTF-8 .*: line 1 column 4 "
        r"\(byte offset 3 in the file\)",
    ),
    "json_array": (
        "jsonl",
        "array.json",
        b'[{"prompt": "' + E_ACUTE + b'"},\n {"prompt": "b}]\n',
        r"array\.json: not valid JSON: Invalid control character at: line 2 column 17 "
        r"\(char 34, byte offset 35 in the file\)",
    ),
    "jsonl_cut_string": (
        "jsonl",
        "cut.jsonl",
        ROW.replace(b"a", E_ACUTE) + CUT_ROW,
        r"cut\.jsonl: row 2: not valid JSON: Unterminated string starting at: "
        r"line 2 column 29 \(char 28 of the line, byte offset 62 in the file\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_BYTES))
def test_a_bad_byte_or_json_error_names_the_row_line_and_byte_offset(tmp_path, case):
    task, name, data, match = BAD_BYTES[case]
    one_line_error(match, load_task, task, _write_bytes(tmp_path / name, data))


def test_a_utf8_byte_order_mark_and_line_separators_in_strings_are_read(tmp_path):
    row = {"prompt": "a\u2028b\u0085c", "response": "d"}  # str.splitlines breaks at both
    text = json.dumps(row, ensure_ascii=False).encode()
    jsonl = _write_bytes(tmp_path / "bom.jsonl", codecs.BOM_UTF8 + text)
    assert load_task("jsonl", jsonl)["train"] == [Example(row["prompt"], "d")]
    csv_path = _write_bytes(tmp_path / "bom.csv", codecs.BOM_UTF8 + b"prompt,response\nq,r\n")
    assert load_task("csv", csv_path)["train"] == [Example("q", "r")]


def test_parquet_damage_and_text_that_is_not_utf8_are_one_line(tmp_path):
    write_parquet(tmp_path / "good.parquet", [{"prompt": "p", "response": "r"}] * 3)
    damaged = bytearray((tmp_path / "good.parquet").read_bytes())
    damaged[4:40] = bytes(36)  # the footer (schema) is intact; the data pages are not
    one_line_error(
        r"damaged\.parquet is not a readable parquet file",
        load_task,
        "parquet",
        _write_bytes(tmp_path / "damaged.parquet", bytes(damaged)),
    )
    raw = pa.array([b"ok", b"ok", b"bad \xff"], pa.binary())
    strings = pa.Array.from_buffers(pa.string(), 3, raw.buffers())  # a string column, not UTF-8
    latin1 = tmp_path / "latin1.parquet"
    pq.write_table(pa.table({"prompt": strings, "response": ["a", "b", "c"]}), latin1)
    one_line_error(
        r"latin1\.parquet: row 3, field 'prompt': text that is not UTF-8",
        load_task,
        "parquet",
        str(latin1),
    )


# ---------------------------------------------------------------------------------------- splits


def numbered(n):
    return [Example(f"prompt {i}", f" response {i}") for i in range(n)]


def test_split_is_pinned_stable_and_independent_of_row_order():
    # Pinned: the same on every machine (content hashes, no RNG state).
    splits = split_examples({"train": numbered(10)}, seed=0, test_size=2, validation_size=1)
    assert [e.prompt for e in splits.test] == ["prompt 1", "prompt 2"]
    assert [e.prompt for e in splits.validation] == ["prompt 9"]
    assert [e.prompt for e in splits.d0] == ["prompt 3", "prompt 5", "prompt 7", "prompt 8"]
    assert [e.prompt for e in splits.d] == ["prompt 0", "prompt 4", "prompt 6"]
    other_seed = split_examples({"train": numbered(10)}, seed=1, test_size=2, validation_size=1)
    assert (
        other_seed.test == splits.test and other_seed.validation == splits.validation
    )  # held out: seed-free
    assert [e.prompt for e in other_seed.d0] == ["prompt 3", "prompt 4", "prompt 5", "prompt 7"]

    reordered = split_examples(
        {"train": numbered(10)[::-1]}, seed=0, test_size=2, validation_size=1
    )
    assert set(reordered.d0) == set(splits.d0) and set(reordered.test) == set(splits.test)


@pytest.mark.parametrize("n", [101, 1000])
def test_halves_are_disjoint_equal_and_cover_the_rest(n):
    train = numbered(n)
    splits = split_examples({"train": train, "test": numbered(3)}, seed=7, validation_size=0.1)
    assert splits.test == numbered(3)  # a test split the source has is kept as is
    assert len(splits.validation) == round(0.1 * n)
    d0, d, val = set(splits.d0), set(splits.d), set(splits.validation)
    assert not (d0 & d) and not (d0 & val) and not (d & val)
    assert d0 | d | val == set(train)
    assert abs(len(d0) - len(d)) <= 1
    assert splits.d0 == sorted(splits.d0, key=train.index)  # source order within a split


def test_limits_take_a_seeded_subset():
    splits = split_examples(
        {"train": numbered(200)},
        seed=3,
        test_size=20,
        validation_size=10,
        max_d0=5,
        max_d=7,
        max_test=4,
        max_validation=0,
    )
    assert splits.sizes() == {"d0": 5, "d": 7, "validation": 0, "test": 4}
    full = split_examples({"train": numbered(200)}, seed=3, test_size=20, validation_size=10)
    assert set(splits.d0) < set(full.d0) and set(splits.test) < set(full.test)
    assert (
        split_examples(
            {"train": numbered(200)}, seed=3, test_size=20, validation_size=10, max_d0=5
        ).d0
        == splits.d0
    )
    other_seed = split_examples(
        {"train": numbered(200)}, seed=4, test_size=20, validation_size=10, max_test=4
    )
    assert other_seed.test == splits.test  # every seed is evaluated on the same test examples


def test_load_splits_end_to_end(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(50)]
    )
    splits = load_splits("jsonl", path, seed=0, test_size=10, validation_size=0)
    assert splits.sizes() == {"d0": 20, "d": 20, "validation": 0, "test": 10}


# ---------------------------------------------------------------------------------------- encoding

VOCAB = {
    "<pad>": 0,
    "</s>": 1,
    "<unk>": 2,
    "<s>": 3,
    **{w: 4 + i for i, w in enumerate("abcdefghij")},
}


def word_tokenizer(template: str | None) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer whose ids are known by hand; `template` adds specials like
    HF does."""
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[("<s>", 3), ("</s>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def ids(text):
    return [VOCAB[w] for w in text.split()]


@pytest.mark.parametrize(
    "template, prefix, suffix",
    [
        ("<s> $A", [3], []),  # LLaMA: BOS first
        ("$A </s>", [], [1]),  # T5: EOS closes the encoder input
        (None, [], []),
    ],
)  # GPT-2: nothing
def test_prompts_cut_from_the_left_inside_special_tokens(template, prefix, suffix):
    tok = word_tokenizer(template)
    examples = [Example("a b c d e f", "g h"), Example("a b", "i j a b c"), Example("c", "")]
    room = 4
    enc = encode_examples(
        tok, examples, max_prompt_tokens=room + len(prefix) + len(suffix), max_response_tokens=4
    )
    assert [p.tolist() for p in enc.prompts] == [
        prefix + ids("c d e f") + suffix,
        prefix + ids("a b") + suffix,
        prefix + ids("c") + suffix,
    ]
    assert enc.num_prompts_cut == 1
    # EOS appended, then cut from the right: a cut response keeps no EOS
    assert [r.tolist() for r in enc.responses] == [ids("g h") + [1], ids("i j a b"), [1]]
    assert enc.num_responses_cut == 1
    assert all(p.dtype == np.int32 for p in enc.prompts + enc.responses)


def test_encoding_matches_the_tokenizer_and_keeps_special_strings_as_text():
    tok = word_tokenizer("<s> $A")
    enc = encode_texts(
        tok, ["a b c"], ["d"], max_prompt_tokens=100, max_response_tokens=100, add_eos=False
    )
    assert enc.prompts[0].tolist() == tok("a b c")["input_ids"] == [3, 4, 5, 6]
    assert enc.responses[0].tolist() == [7]
    enc = encode_texts(
        tok, ["a </s> b"], ["c </s>"], max_prompt_tokens=100, max_response_tokens=100
    )
    assert (
        1 not in enc.prompts[0].tolist() and enc.responses[0].tolist().count(1) == 1
    )  # only the real EOS
    with pytest.raises(ValueError, match="no room"):
        encode_texts(tok, ["a"], ["b"], max_prompt_tokens=1, max_response_tokens=4)


# ---------------------------------------------------------------------------------------- batching


def test_bucket_lengths():
    assert [bucket_length(n) for n in (0, 1, 8, 9, 17, 33, 64, 65, 128, 129)] == [
        8,
        8,
        8,
        16,
        32,
        64,
        64,
        128,
        128,
        192,
    ]
    assert [bucket_length(n, 32) for n in (5, 31, 33, 70)] == [8, 32, 64, 96]
    assert [bucket_length(n, (16, 128, 512)) for n in (1, 16, 17, 300)] == [16, 16, 128, 512]
    with pytest.raises(ValueError, match="largest bucket 512"):
        bucket_length(513, (16, 128, 512))


def synthetic(n, seed=0, max_prompt=150, max_response=40):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(4, 100, rng.integers(1, max_prompt)).astype(np.int32) for _ in range(n)]
    responses = [
        rng.integers(4, 100, rng.integers(1, max_response)).astype(np.int32) for _ in range(n)
    ]
    return EncodedExamples(prompts, responses)


def test_batches_are_right_padded_bucketed_and_exact():
    enc = synthetic(37)
    out = list(batches(enc, 8, shuffle_seed=None, pad_id=0))
    assert [len(b.prompt_ids) for b in out] == [8, 8, 8, 8, 5]
    for b in out:
        assert type(b) is SequenceBatch and b.frozen_outputs is None and b.reference_ids is None
        assert len(jax.tree.leaves(b)) == 5  # prompt, response (ids, mask), example_index
        assert all(v.dtype == np.int32 for v in jax.tree.leaves(b))
        width = max(len(enc.prompts[i]) for i in b.example_index)
        assert b.prompt_ids.shape[1] == bucket_length(width)
        for row, i in enumerate(b.example_index):
            p, r = enc.prompts[i], enc.responses[i]
            np.testing.assert_array_equal(b.prompt_ids[row, : len(p)], p)
            assert b.prompt_mask[row].tolist() == [1] * len(p) + [0] * (
                b.prompt_mask.shape[1] - len(p)
            )
            np.testing.assert_array_equal(b.response_ids[row, : len(r)], r)
            assert b.response_mask[row].sum() == len(r) and not b.response_ids[row, len(r) :].any()
        assert int(b.num_tokens()) == sum(
            len(enc.prompts[i]) + len(enc.responses[i]) for i in b.example_index
        )
    assert np.concatenate([b.example_index for b in out]).tolist() == list(range(37))
    assert len(list(batches(enc, 8, drop_last=True))) == 4
    filled = list(batches(enc, 8, fill_last=True))[-1]
    assert filled.example_index.tolist() == [32, 33, 34, 35, 36, -1, -1, -1]
    assert not filled.prompt_mask[5:].any() and not filled.response_mask[5:].any()


def assert_same_batch(a, b):
    """Same type, same fields set, same arrays."""
    assert type(a) is type(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_join_parts_makes_the_batch_a_method_declares():
    """A response part alone is a SequenceBatch; with chosen and rejected parts a PairBatch whose
    prompts are the first part's and whose fields hold each part's responses; unset fields are no
    leaves (placement and micro-batching never see them)."""
    enc = synthetic(6)
    other = EncodedExamples(enc.prompts, [r[:1] for r in enc.responses])
    parts = {name: make_batch(e, range(4)) for name, e in (("response", enc), ("chosen", other))}
    alone = join_parts({"response": parts["response"]})
    assert type(alone) is SequenceBatch and alone.example_index is None
    np.testing.assert_array_equal(alone.response_ids, parts["response"].response_ids)
    pair = join_parts({**parts, "rejected": parts["response"], "reference": parts["chosen"]})
    assert type(pair) is PairBatch
    np.testing.assert_array_equal(pair.prompt_ids, parts["response"].prompt_ids)
    np.testing.assert_array_equal(pair.chosen_ids, parts["chosen"].response_ids)
    np.testing.assert_array_equal(pair.chosen_mask, [[1] + [0] * 7] * 4)
    np.testing.assert_array_equal(pair.rejected_ids, parts["response"].response_ids)
    np.testing.assert_array_equal(pair.reference_ids, parts["chosen"].response_ids)
    assert len(jax.tree.leaves(pair)) == 10
    assert len(jax.tree.leaves(pair.replace(reference_ids=None, reference_mask=None))) == 8
    game = join_parts({**parts, "rejected": parts["chosen"]}, GameBatch)
    assert type(game) is GameBatch and game.sample_ids is None and len(jax.tree.leaves(game)) == 8
    with pytest.raises(TypeError):
        join_parts({"chosen": parts["chosen"], "pos": parts["response"]})


def test_epoch_order_is_pinned_deterministic_and_a_permutation():
    assert epoch_order(10, shuffle_seed=0, epoch=0).tolist() == [0, 9, 1, 6, 3, 5, 4, 2, 8, 7]
    assert epoch_order(10, shuffle_seed=0, epoch=1).tolist() == [2, 5, 8, 9, 1, 4, 6, 0, 3, 7]
    order = epoch_order(1000, shuffle_seed=5, epoch=3)
    assert sorted(order.tolist()) == list(range(1000))
    np.testing.assert_array_equal(order, epoch_order(1000, shuffle_seed=5, epoch=3))
    assert not np.array_equal(order, epoch_order(1000, shuffle_seed=5, epoch=4))
    assert not np.array_equal(order, epoch_order(1000, shuffle_seed=6, epoch=3))

    enc = synthetic(50)
    first = list(batches(enc, 16, shuffle_seed=1, epoch=2))
    again = list(batches(enc, 16, shuffle_seed=1, epoch=2))
    for a, b in zip(first, again, strict=True):
        assert_same_batch(a, b)


def test_resuming_from_a_position_equals_continuing():
    enc = synthetic(45)  # 5 batches of 9 per epoch
    run = iterate_batches(enc, 9, shuffle_seed=4, num_epochs=3)
    straight = list(run)
    assert len(straight) == 15
    assert straight[4][1] == DataPosition(1, 0) and straight[6][1] == DataPosition(1, 2)
    for stop in (0, 3, 4, 5, 6, 13):
        position = straight[stop][1]  # saved with the checkpoint after batch `stop`
        resumed = list(iterate_batches(enc, 9, shuffle_seed=4, position=position, num_epochs=3))
        assert len(resumed) == 15 - stop - 1
        for (a, pa_), (b, pb) in zip(straight[stop + 1 :], resumed, strict=True):
            assert pa_ == pb
            assert_same_batch(a, b)
    assert (
        list(iterate_batches(enc, 9, shuffle_seed=4, position=DataPosition(2, 5), num_epochs=3))
        == []
    )


@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_host_shards_cover_every_row_once(hosts):
    enc = synthetic(64)
    for batch in batches(enc, 16, shuffle_seed=0):
        shards = [host_shard(batch, i, hosts) for i in range(hosts)]
        assert all(
            type(s) is SequenceBatch
            and s.prompt_ids.shape == (16 // hosts, batch.prompt_ids.shape[1])
            for s in shards
        )
        joined = jax.tree.map(lambda *parts: np.concatenate(parts), *shards)
        assert_same_batch(joined, batch)
    with pytest.raises(ValueError, match="multiple of the process count"):
        host_shard(next(batches(enc, 6)), 0, 4)


# ---------------------------------------------------------------------------------------- demo task

FAKE_ALPHA = textwrap.dedent('''\
    """Alpha module for tests.

    It carries a body that is long enough for the demo filter.
    """

    def first(x):
        """Return the first thing you give.

        The body explains the argument x in more than forty characters.
        """

    class Box:
        """A box that holds items.

        Items go in and come out again, in the order they went in.
        """

        def open(self):
            """readline(size) -> str

            A signature rather than a summary, so it is skipped entirely.
            """

    if True:
        def nested():
            """Tiny body is skipped.

            Short.
            """

        def copy():
            """Another summary for the same body.

            The body explains the argument x in more than forty characters.
            """
    ''')


def fake_stdlib(root):
    (root / "pkg").mkdir(parents=True)
    (root / "alpha.py").write_text(FAKE_ALPHA)
    (root / "pkg" / "__init__.py").write_text(
        '"""Package level summary.\n\nThe package body text also passes '
        'the forty character minimum."""\n'
    )
    for skipped in ("test", "site-packages"):
        (root / skipped).mkdir()
        (root / skipped / "z.py").write_text(
            'def f():\n    """Skipped summary here.\n\nA body that is long enough '
            'to count, but the folder is skipped."""\n'
        )
    (root / "broken.py").write_text("def (:\n")
    return root


def digest(examples):
    return hashlib.sha256(json.dumps([e.as_dict() for e in examples]).encode()).hexdigest()


def test_demo_examples_from_a_fake_stdlib_are_exact_and_deterministic(tmp_path):
    root = fake_stdlib(tmp_path)
    expected = [
        Example(
            "module alpha\n\nIt carries a body that is long enough for the demo "
            "filter.\n\nSUMMARY:",
            " Alpha module for tests.",
        ),
        Example(
            "def alpha.first\n\nThe body explains the argument x in more than forty "
            "characters.\n\nSUMMARY:",
            " Return the first thing you give.",
        ),
        Example(
            "class alpha.Box\n\nItems go in and come out again, in the order they went "
            "in.\n\nSUMMARY:",
            " A box that holds items.",
        ),
        Example(
            "module pkg\n\nThe package body text also passes the forty character "
            "minimum.\n\nSUMMARY:",
            " Package level summary.",
        ),
    ]
    assert docstring_examples(root) == expected
    assert docstring_examples(root) == expected
    # a fresh interpreter with other hash seeds builds the same list
    code = (
        "import hashlib, json, sys; from plad_jax.data import docstring_examples as d; "
        "print(hashlib.sha256(json.dumps([e.as_dict() for e in "
        "d(sys.argv[1])]).encode()).hexdigest())"
    )
    for hash_seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run(
            [sys.executable, "-c", code, str(root)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == digest(expected)


def test_demo_task_splits(monkeypatch):
    monkeypatch.setattr(demo, "docstring_examples", lambda: numbered(100))
    assert load_splits("demo").sizes() == {"d0": 43, "d": 42, "validation": 5, "test": 10}


@pytest.fixture(scope="module")
def demo_examples():
    return docstring_examples()


def test_demo_task_from_the_stdlib_is_large_and_clean(demo_examples):
    assert len(demo_examples) >= 2000
    assert len({e.prompt for e in demo_examples}) == len(demo_examples)
    assert all(
        e.prompt.endswith("\n\nSUMMARY:") and e.response.startswith(" ") for e in demo_examples
    )
    assert all(10 <= len(e.response) - 1 <= 160 and "\n" not in e.response for e in demo_examples)
    assert any(e.prompt.startswith("def textwrap.indent\n") for e in demo_examples)


@pytest.fixture(scope="module")
def demo_tokenizer_dir(demo_examples, tmp_path_factory):
    splits = split_examples({"train": demo_examples})
    return build_demo_tokenizer(
        tmp_path_factory.mktemp("demo") / "tokenizer", demo_tokenizer_texts(splits.d0 + splits.d)
    )


def test_demo_tokenizer_loads_with_auto_tokenizer_and_round_trips(
    demo_tokenizer_dir, demo_examples
):
    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    assert len(tok) == 2000
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    text = demo_examples[0].prompt + demo_examples[0].response
    assert tok(text)["input_ids"][0] == 2 and tok(text)["input_ids"][-1] != 3  # BOS first, no EOS
    for e in demo_examples[::10] + [
        Example("naïve café 😀 12345\n\ttabs  and  spaces", " </s> <s>")
    ]:
        for t in (e.prompt, e.response.lstrip(" ")):
            assert (
                tok.decode(tok(t, add_special_tokens=False, split_special_tokens=True)["input_ids"])
                == t
            )
    assert os.path.exists(os.path.join(demo_tokenizer_dir, demo.SP_MODEL_FILE))


def test_demo_tokenizer_is_reused_and_training_is_deterministic(
    demo_tokenizer_dir, demo_examples, monkeypatch
):
    texts = demo_tokenizer_texts(demo_examples[:300])
    model = demo.train_sentencepiece(texts, vocab_size=1000)
    assert (
        demo.train_sentencepiece(texts[::-1] + texts[:5], vocab_size=1000) == model
    )  # order, duplicates: no effect
    monkeypatch.setattr(
        demo, "train_sentencepiece", lambda *a, **k: pytest.fail("retrained an existing tokenizer")
    )
    assert build_demo_tokenizer(demo_tokenizer_dir, []) == str(demo_tokenizer_dir)


def test_sentencepiece_reference_gives_the_transformers_ids(demo_tokenizer_dir, demo_examples):
    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    with open(os.path.join(demo_tokenizer_dir, demo.SP_MODEL_FILE), "rb") as f:
        model = f.read()
    examples = demo_examples[::5] + [
        Example("SUBREDDIT: r/x\n\nTITLE: </s> hi\n\nPOST: a  b\n\nTL;DR:", " two  words"),
        Example("  leading spaces", "no space"),
        Example("x", ""),
    ]
    hf = encode_examples(tok, examples, 128, 24)
    assert hf.num_prompts_cut > 0 and hf.num_responses_cut > 0
    sp = tf_pipeline.encode_with_sentencepiece(
        model,
        [e.prompt for e in examples],
        [e.response for e in examples],
        128,
        24,
        prompt_prefix=[tok.bos_token_id],
        eos_id=tok.eos_token_id,
    )
    assert (sp.num_prompts_cut, sp.num_responses_cut) == (hf.num_prompts_cut, hf.num_responses_cut)
    for a, b in zip(hf.prompts + hf.responses, sp.prompts + sp.responses, strict=True):
        assert a.tolist() == b.tolist()


def test_tf_pipeline_yields_the_numpy_batches(demo_tokenizer_dir, demo_examples):
    if not os.environ.get("CI"):  # CI installs the tf extra: there a missing tensorflow-text fails
        pytest.importorskip("tensorflow_text")
    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    with open(os.path.join(demo_tokenizer_dir, demo.SP_MODEL_FILE), "rb") as f:
        model = f.read()
    examples = demo_examples[:70]
    expected = list(batches(encode_examples(tok, examples, 96, 16), 16, shuffle_seed=3, epoch=1))
    got = tf_pipeline.tf_batches(
        model,
        [e.prompt for e in examples],
        [e.response for e in examples],
        16,
        max_prompt_tokens=96,
        max_response_tokens=16,
        prompt_prefix=[tok.bos_token_id],
        eos_id=tok.eos_token_id,
        shuffle_seed=3,
        epoch=1,
    )
    got = list(tf_pipeline.as_batches(got))
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        assert_same_batch(a, b)

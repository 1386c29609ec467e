"""Material for pipeline tests: a TL;DR-format jsonl file, word-level tokenizers and tiny random HF
models (LLaMA-class and T5 v1.1) saved with `save_pretrained`, as a user's local copies would be.

The summaries are the first words of each post, so a model that learns anything copies them;
nothing here needs the network.
"""

from __future__ import annotations

import json
import os

import numpy as np

WORDS = (
    "the cat dog bird fish tree car road house city river hill small big red blue green old new "
    "fast slow runs sits jumps eats sees finds takes gives makes walks over under near far up "
    "down in on at with from into this that my your our their happy sad warm cold bright dark"
).split()
SUBREDDITS = ("cats", "dogs", "travel", "cooking")
SPECIALS_LLAMA = ["<pad>", "<s>", "</s>", "<unk>"]
SPECIALS_T5 = ["<pad>", "</s>", "<unk>"]


def write_tldr_jsonl(path, n: int = 48, seed: int = 0) -> str:
    """OpenAI TL;DR jsonl rows (id, subreddit, title, post, summary)."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            post = " ".join(rng.choice(WORDS, size=int(rng.integers(8, 16))))
            title = " ".join(rng.choice(WORDS, size=3))
            row = {
                "id": f"t3_{i}",
                "subreddit": SUBREDDITS[i % len(SUBREDDITS)],
                "title": title,
                "post": post,
                "summary": " " + " ".join(post.split()[:4]),
            }
            f.write(json.dumps(row) + "\n")
    return str(path)


def word_tokenizer(style: str = "llama", extra_words: tuple[str, ...] = ()):
    """A word-level fast tokenizer over WORDS and the TL;DR template's words: `llama` puts BOS first
    (ids: pad 0, bos 1, eos 2), `t5` puts EOS last (pad 0, eos 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS_LLAMA if style == "llama" else SPECIALS_T5
    template = ["SUBREDDIT", ":", "r", "/", "TITLE", "POST", "TL", ";", "DR", *SUBREDDITS]
    vocab = {
        w: i
        for i, w in enumerate(dict.fromkeys(specials + template + list(WORDS) + list(extra_words)))
    }
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    if style == "llama":
        raw.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=raw,
            pad_token="<pad>",
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
        )
    raw.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def save_llama(path, tokenizer, *, hidden: int, layers: int, seed: int) -> str:
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def save_t5(path, tokenizer, *, d_model: int, layers: int, seed: int) -> str:
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    transformers.T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build(root, family: str = "llama") -> dict:
    """{"teacher": dir, "student": dir, "data": jsonl}: a larger teacher and a smaller student of
    one family sharing one tokenizer, and a TL;DR file, under `root`."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    tokenizer = word_tokenizer("llama" if family == "llama" else "t5")
    save = save_llama if family == "llama" else save_t5
    size = "hidden" if family == "llama" else "d_model"
    return {
        "teacher": save(
            os.path.join(root, f"{family}-teacher"), tokenizer, **{size: 32}, layers=2, seed=1
        ),
        "student": save(
            os.path.join(root, f"{family}-student"), tokenizer, **{size: 16}, layers=1, seed=2
        ),
        "data": write_tldr_jsonl(os.path.join(root, "tldr.jsonl")),
    }


def tiny_overrides(paths: dict, **more) -> list[str]:
    """`--set` strings pointing the tiny preset at `build`'s output (TL;DR layout)."""
    sets = {
        "teacher.path": paths["teacher"],
        "student.path": paths["student"],
        "data.task": "tldr",
        "data.path": paths["data"],
        "data.max_prompt_tokens": 24,
        **more,
    }
    return [f"{k}={v}" for k, v in sets.items()]

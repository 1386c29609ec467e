"""Scorers: win rate, ROUGE-L against an independent LCS, a tiny local transformers reward model."""

import re

import numpy as np
import pytest
import torch
import transformers

from plad_jax.config import UserError
from plad_jax.scoring.rewards import (
    HFRewardModel,
    JaxRewardModel,
    RewardModelError,
    RougeScorer,
    make_scorer,
    win_rate,
)

WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "is",
    "was",
    "good",
    "bad",
    "post",
    "tl",
    "dr",
    "it",
    "so",
    "red",
    "big",
    "run",
    "ran",
]


def test_win_rate_counts_ties_as_half():
    # wins, tie, loss, tie, win -> (1 + 0.5 + 0 + 0.5 + 1) / 5
    assert win_rate([3, 1, 2, 2, 5], [1, 1, 4, 2, 0]) == pytest.approx(0.6)
    assert win_rate([1.0], [1.0]) == 0.5
    assert np.isnan(win_rate([], []))
    with pytest.raises(ValueError):
        win_rate([1, 2], [1])


def _lcs_f1(response, reference):
    """ROUGE-L F1 by hand: rouge-score's tokens (lowercase [a-z0-9] runs), LCS by dynamic
    programming."""
    a, b = re.findall(r"[a-z0-9]+", response.lower()), re.findall(r"[a-z0-9]+", reference.lower())
    table = np.zeros((len(a) + 1, len(b) + 1), int)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1, j + 1] = (
                table[i, j] + 1 if x == y else max(table[i, j + 1], table[i + 1, j])
            )
    lcs = table[-1, -1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def test_rouge_scorer_is_rouge_l_f1():
    # Words of at most 3 letters, which the Porter stemmer leaves alone.
    responses = ["the cat sat on the mat", "The DOG ran.", "a big red dog", "so it is", ""]
    references = [
        "the cat is on the mat",
        "the dog ran",
        "the dog was big and red",
        "it was so",
        "a cat",
    ]
    scores = RougeScorer().score(["p"] * 5, responses, references)
    assert scores[0] == pytest.approx(
        5 / 6
    )  # LCS "the cat on the mat" = 5 of 6 tokens on both sides
    assert scores[1] == pytest.approx(1.0)  # case and punctuation are ignored
    np.testing.assert_allclose(
        scores, [_lcs_f1(r, ref) for r, ref in zip(responses, references)], atol=1e-12
    )
    assert len(set(np.round(scores, 6))) == 5


def test_rouge_scorer_needs_references():
    with pytest.raises(UserError, match="references"):
        RougeScorer().score(["p"], ["a cat"], None)


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory):
    """A random DeBERTa-v2 (the paper judge's architecture: relative attention, no token types)
    with one output, and a WordPiece tokenizer, saved like a hub model directory."""
    path = tmp_path_factory.mktemp("reward_model")
    config = transformers.DebertaV2Config(
        vocab_size=len(WORDS),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=1,
        max_position_embeddings=64,
        type_vocab_size=0,
        relative_attention=True,
        position_biased_input=False,
        pos_att_type=["p2c", "c2p"],
        position_buckets=16,
        initializer_range=0.5,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    transformers.DebertaV2ForSequenceClassification(config).save_pretrained(path)
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(path)
    return path


PROMPTS = ["the cat sat on the mat", "a dog", "tl dr it was so big", "post", "the red dog ran on"]
RESPONSES = ["it is good", "the dog was a bad dog on the big mat", "so", "a red cat sat", "it ran"]


@torch.no_grad()
def test_hf_reward_model_scores_are_the_models_logits(tiny_reward_model):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_reward_model)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tiny_reward_model
    ).eval()
    expected = [
        model(**tokenizer(p, r, return_tensors="pt")).logits[0, 0].item()
        for p, r in zip(PROMPTS, RESPONSES)
    ]

    # Batches of 2 over 5 pairs of different lengths: padding and the length sort are exercised.
    scores = HFRewardModel(str(tiny_reward_model), batch_size=2).score(PROMPTS, RESPONSES, None)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert scores.shape == (5,) and np.ptp(scores) > 1e-3


@pytest.mark.parametrize("where", ["no-such-model", "empty-dir"])
def test_missing_reward_model_is_one_line(tmp_path, where):
    path = tmp_path / where
    if where == "empty-dir":
        path.mkdir()
    with pytest.raises(RewardModelError) as info:
        HFRewardModel(str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "rouge" in message


def test_hf_reward_model_refuses_pickled_weights(tiny_reward_model, tmp_path):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_reward_model)
    model.config.save_pretrained(tmp_path)
    torch.save(
        model.state_dict(), tmp_path / "pytorch_model.bin"
    )  # a pickle, which must not be loaded
    transformers.AutoTokenizer.from_pretrained(tiny_reward_model).save_pretrained(tmp_path)
    with pytest.raises(RewardModelError, match="cannot load the reward model"):
        HFRewardModel(str(tmp_path))


def test_jax_reward_model_batches_a_callable():
    calls = []

    def reward_fn(prompts, responses):
        calls.append(len(responses))
        return np.array([len(p) - len(r) for p, r in zip(prompts, responses)], np.float32)

    scores = JaxRewardModel(reward_fn, batch_size=2).score(PROMPTS, RESPONSES)
    np.testing.assert_array_equal(scores, [len(p) - len(r) for p, r in zip(PROMPTS, RESPONSES)])
    assert calls == [2, 2, 1]

    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        JaxRewardModel(lambda p, r: [0.0], batch_size=2).score(PROMPTS, RESPONSES)


def test_make_scorer(tiny_reward_model):
    assert isinstance(make_scorer("rouge"), RougeScorer)
    scorer = make_scorer("reward_model", str(tiny_reward_model), batch_size=3)
    assert isinstance(scorer, HFRewardModel) and scorer.batch_size == 3
    jax_scorer = make_scorer("jax_reward_model", "rm", 4, reward_fn=lambda p, r: np.ones(len(p)))
    np.testing.assert_array_equal(jax_scorer.score(["a"], ["b"]), [1.0])
    with pytest.raises(UserError, match="saved plad_jax reward model"):
        make_scorer("jax_reward_model", "")
    from plad_jax.models import CheckpointError

    with pytest.raises(CheckpointError, match="not a saved plad_jax reward model"):
        make_scorer("jax_reward_model", str(tiny_reward_model))  # a transformers RM is not ours
    with pytest.raises(UserError, match="unknown scorer 'bleu'"):
        make_scorer("bleu")

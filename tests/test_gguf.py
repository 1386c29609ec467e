"""GGUF import and export, and students cut from a checkpoint's layers.

The GGUF files are written here with `gguf.GGUFWriter` the way llama.cpp's converter writes them
(its names, its Q/K row permutation for `llama`, 1-D tensors in F32), from tiny random
transformers models, so the reference for every logit is transformers loading the same file.
"""

import json
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from gguf.quants import dequantize, quantize
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from plad_jax import launch
from plad_jax import sharding as shd
from plad_jax.models import CheckpointError, from_pretrained, lora
from plad_jax.models.io import gguf as gguf_io
from plad_jax.models.io.gguf import GGUFFile
from tests.helpers import (
    PROMPT_LENS,
    RESPONSE_LENS,
    max_abs_diff_real,
    padded_batch,
    reference_logits,
)

READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# llama.cpp's tensor names (convert_hf_to_gguf.py / gguf.TensorNameMap), written out independently.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "Return the sum of two numbers.",
    "for i in range(10): print(i)",
] * 4


# -- fixtures: a tiny byte-level tokenizer, tiny models, and GGUF files written from them ----------


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
    )


def tiny_model(kind, vocab, *, hidden=32, inter=64, layers=2, seed=0):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    if kind == "qwen2":
        config = transformers.Qwen2Config(tie_word_embeddings=False, **common)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(tie_word_embeddings=kind == "llama_tied", **common)
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the init's std 0.02, so errors show in the logits
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def llama_cpp_permute(w, heads):
    """What llama.cpp's converter does to llama Q and K rows (LlamaModel.permute)."""
    halves = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
    return halves.swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_name(hf_name):
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    block, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    for ours, theirs in LAYER_NAMES.items():
        if rest.startswith(ours):
            return f"blk.{block}.{theirs}{rest[len(ours) :]}"
    raise KeyError(hf_name)


def add_tokenizer(writer, tok):
    vocab = tok.get_vocab()
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])])
    writer.add_token_types([3 if i in tok.all_special_ids else 1 for i in range(len(vocab))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)


# The gguf package cannot quantize K-quants, so their blocks are random bytes with small finite
# f16 scales (byte offsets of d / dmin in each block, from ggml's block_q4_K / q5_K / q6_K).
K_SCALES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_k_blocks(kind, shape, rng):
    block, size = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // block, size), dtype=np.uint8)
    for offset in K_SCALES[kind.name]:
        scale = rng.uniform(1e-3, 4e-3, len(blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(shape[0], -1)


def write_gguf(model, path, qtype="F32", tok=None, arch=None):
    """`model` as llama.cpp's converter writes it: 2-D weights as `qtype`, 1-D tensors in F32."""
    c = model.config
    arch = arch or c.model_type
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    if tok is not None:
        add_tokenizer(writer, tok)
    rng = np.random.default_rng(0)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = tensor.float().numpy()
        if c.model_type == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads
            w = llama_cpp_permute(w, heads)
        kind = getattr(gguf.GGMLQuantizationType, qtype if w.ndim == 2 else "F32")
        data = random_k_blocks(kind, w.shape, rng) if kind.name in K_SCALES else quantize(w, kind)
        raw_dtype = kind if data.dtype == np.uint8 else None
        writer.add_tensor(gguf_tensor_name(name), data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def hf_from_gguf(path, cls=transformers.AutoModelForCausalLM):
    return cls.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()


def batch_for(vocab):
    return padded_batch(0, vocab, PROMPT_LENS, RESPONSE_LENS)


# -- import ---------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", READ_TYPES)
def test_dequantized_tensors_equal_the_gguf_packages(tmp_path, tokenizer, qtype):
    """Rows 256 long (one K-quant super-block, eight 32-blocks); shards read only their rows."""
    model = tiny_model("llama_tied", len(tokenizer), hidden=256, inter=512, layers=1)
    path = write_gguf(model, tmp_path / "m.gguf", qtype, tokenizer)
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    for t in theirs.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        expected = dequantize(t.data, t.tensor_type).reshape(shape)
        hf_name = {
            "token_embd.weight": "model.embed_tokens.weight",
            "output_norm.weight": "model.norm.weight",
            "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
            "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
        }.get(t.name)
        if hf_name is None:
            continue
        np.testing.assert_array_equal(ours.read(hf_name), expected)
        if expected.ndim == 2:
            shard = ours.read(hf_name, (slice(3, 9), slice(40, 300)))
            np.testing.assert_array_equal(shard, expected[3:9, 40:300])
    if qtype != "F32":
        assert {t.tensor_type.name for t in theirs.tensors if len(t.shape) == 2} == {qtype}


@pytest.mark.parametrize(
    "kind,qtype",
    [
        ("llama_tied", "F32"),
        ("llama_untied", "F32"),
        ("qwen2", "F32"),
        ("llama_tied", "Q8_0"),
        ("qwen2", "Q4_1"),
        ("llama_untied", "Q5_0"),
    ],
)
def test_logits_equal_transformers_on_the_same_gguf(tmp_path, tokenizer, kind, qtype):
    model = tiny_model(kind, len(tokenizer))
    path = write_gguf(model, tmp_path / "m.gguf", qtype, tokenizer)
    lm = from_pretrained(path)
    assert lm.model_type == ("qwen2" if kind == "qwen2" else "llama")
    assert lm.config.tie_word_embeddings == (kind == "llama_tied")
    assert lm.config.attention_bias == (kind == "qwen2")
    batch = batch_for(len(tokenizer))
    reference = reference_logits(hf_from_gguf(path), *batch)
    assert max_abs_diff_real(lm.logits(*batch), reference, batch[3]) <= 1e-4


def test_k_quant_logits_equal_transformers(tmp_path, tokenizer):
    model = tiny_model("llama_tied", len(tokenizer), hidden=256, inter=256, layers=1)
    path = write_gguf(model, tmp_path / "m.gguf", "Q4_K", tokenizer)
    batch = batch_for(len(tokenizer))
    reference = reference_logits(hf_from_gguf(path), *batch)
    assert max_abs_diff_real(from_pretrained(path).logits(*batch), reference, batch[3]) <= 1e-4


def test_a_directory_holding_one_gguf_loads_in_the_requested_dtype(tmp_path, tokenizer):
    model = tiny_model("qwen2", len(tokenizer))
    write_gguf(model, tmp_path / "m.gguf", "F16", tokenizer)
    lm = from_pretrained(str(tmp_path), dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(lm.params)} == {jnp.dtype(jnp.bfloat16)}


def test_sharded_loading_equals_single_device(tmp_path, tokenizer):
    model = tiny_model("llama_untied", len(tokenizer))
    path = write_gguf(model, tmp_path / "m.gguf", "Q8_0", tokenizer)
    mesh = shd.make_mesh((2, 2, 2))
    single, sharded = from_pretrained(path), from_pretrained(path, mesh=mesh)
    flat_single = dict(jax_flat(single.params))
    for key, value in jax_flat(sharded.params):
        assert len(value.sharding.device_set) == 8
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_single[key]))
    assert any(not value.sharding.is_fully_replicated for _, value in jax_flat(sharded.params))
    batch = batch_for(len(tokenizer))
    expected = np.asarray(single.logits(*batch))
    np.testing.assert_allclose(np.asarray(sharded.logits(*batch)), expected, atol=1e-5)


def jax_flat(state):
    from flax import nnx

    return [(k, v.get_value()) for k, v in nnx.to_flat_state(state)]


def test_tokenizer_from_gguf_metadata(tmp_path, tokenizer):
    from plad_jax.models.hf import load_tokenizer

    model = tiny_model("llama_tied", len(tokenizer))
    tok = load_tokenizer(write_gguf(model, tmp_path / "m.gguf", "F32", tokenizer))
    for text in TEXTS[:4]:
        assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (tok.eos_token_id, tok.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_a_gguf_is_parsed_once_per_process_until_it_changes(tmp_path, tokenizer):
    """Every stage and role opens the same file: the parsed file and tokenizer are reused, each
    caller gets its own tokenizer, and a file rewritten in place is read again."""
    from plad_jax.models import hf

    path = write_gguf(
        tiny_model("llama_tied", len(tokenizer)), tmp_path / "m.gguf", "F32", tokenizer
    )
    assert gguf_io.open_file(path) is gguf_io.open_file(str(tmp_path / "." / "m.gguf"))
    first, second = hf.load_tokenizer(path), hf.load_tokenizer(path)
    assert first is not second
    first.pad_token = first.eos_token  # a caller's change stays its own
    assert second.pad_token_id == tokenizer.pad_token_id
    assert hf.load_tokenizer(path).pad_token_id == tokenizer.pad_token_id
    before = gguf_io.open_file(path)
    write_gguf(tiny_model("llama_tied", len(tokenizer), layers=3), path, "F32", tokenizer)
    after = gguf_io.open_file(path)
    assert after is not before and after.hf_config()["num_hidden_layers"] == 3


# -- students cut from a checkpoint's blocks -------------------------------------------------------


def torch_cut(model, keep):
    """The same cut in torch: the kept decoder blocks, in order, everything else untouched."""
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    for j, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = j
    return model


def test_cut_student_from_safetensors_equals_the_torch_cut(tmp_path, tokenizer):
    model = tiny_model("qwen2", len(tokenizer), layers=4)
    model.save_pretrained(str(tmp_path / "hf"))
    keep = [3, 0, 2]
    lm = from_pretrained(str(tmp_path / "hf"), layers=keep)
    assert lm.config.num_layers == 3 and lm.hf_config["num_hidden_layers"] == 3
    batch = batch_for(len(tokenizer))
    reference = reference_logits(torch_cut(model, keep), *batch)
    assert max_abs_diff_real(lm.logits(*batch), reference, batch[3]) <= 1e-4


def test_cut_student_from_gguf_equals_the_torch_cut_and_exports(tmp_path, tokenizer):
    model = tiny_model("llama_tied", len(tokenizer), layers=4)
    path = write_gguf(model, tmp_path / "m.gguf", "Q8_0", tokenizer)
    keep = [1, 3]
    lm = from_pretrained(path, layers=keep)
    batch = batch_for(len(tokenizer))
    reference = reference_logits(torch_cut(hf_from_gguf(path), keep), *batch)
    assert max_abs_diff_real(lm.logits(*batch), reference, batch[3]) <= 1e-4
    lm.save_pretrained(str(tmp_path / "cut"))  # a plain two-layer model from then on
    again = from_pretrained(str(tmp_path / "cut"))
    np.testing.assert_array_equal(np.asarray(again.logits(*batch)), np.asarray(lm.logits(*batch)))
    sharded = from_pretrained(path, layers=keep, mesh=shd.make_mesh((2, 2, 2)))
    cut_logits = np.asarray(lm.logits(*batch))
    np.testing.assert_allclose(np.asarray(sharded.logits(*batch)), cut_logits, atol=1e-5)
    adapted = lora.add_lora(sharded, lora.LoRAConfig(rank=2), seed=0)  # B starts at 0: same model
    np.testing.assert_allclose(np.asarray(adapted.logits(*batch)), cut_logits, atol=1e-5)
    adapted.save_gguf(str(tmp_path / "cut.gguf"), "f32", tokenizer=tokenizer)
    theirs = reference_logits(hf_from_gguf(str(tmp_path / "cut.gguf")), *batch)
    assert max_abs_diff_real(lm.logits(*batch), theirs, batch[3]) <= 1e-4


def test_cut_gpt_neo_blocks_keep_their_attention_kind(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPTNeoConfig(
        vocab_size=64,
        hidden_size=16,
        num_layers=4,
        num_heads=4,
        attention_types=[[["global", "local"], 2]],
        window_size=3,
        max_position_embeddings=32,
    )
    model = transformers.GPTNeoForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(str(tmp_path / "neo"))
    keep = [3, 0]  # local, then global
    lm = from_pretrained(str(tmp_path / "neo"), layers=keep)
    assert lm.config.attention_layers == (3, None)
    model.config.attention_layers = [config.attention_layers[i] for i in keep]
    model.config.num_layers = len(keep)
    model.transformer.h = torch.nn.ModuleList([model.transformer.h[i] for i in keep])
    for j, block in enumerate(model.transformer.h):
        block.attn.attention.layer_id = j  # its slot in the KV cache
    batch = padded_batch(0, 64, PROMPT_LENS, RESPONSE_LENS)
    assert max_abs_diff_real(lm.logits(*batch), reference_logits(model, *batch), batch[3]) <= 1e-4


def test_cut_t5_keeps_the_shared_position_table(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=3,
        num_decoder_layers=3,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
    )
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(str(tmp_path / "t5"))
    lm = from_pretrained(str(tmp_path / "t5"), layers={"layers": [2, 1], "decoder_layers": [1]})
    for stack, keep in ((model.encoder, [2, 1]), (model.decoder, [1])):
        table = stack.block[0].layer[0].SelfAttention
        blocks = [stack.block[i] for i in keep]
        blocks[0].layer[0].SelfAttention.relative_attention_bias = table.relative_attention_bias
        blocks[0].layer[0].SelfAttention.has_relative_attention_bias = True
        stack.block = torch.nn.ModuleList(blocks)
    batch = padded_batch(0, 64, PROMPT_LENS, RESPONSE_LENS)
    assert max_abs_diff_real(lm.logits(*batch), reference_logits(model, *batch), batch[3]) <= 1e-4


# -- export ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """A qwen2 (q/k/v bias) and a llama GQA model loaded in plad_jax, then written as GGUF."""
    out = {}
    for kind in ("qwen2", "llama_untied"):
        root = tmp_path_factory.mktemp(kind)
        tiny_model(kind, len(tokenizer)).save_pretrained(str(root / "hf"))
        lm = from_pretrained(str(root / "hf"))
        files = {}
        for dtype in ("f32", "f16", "bf16", "q8_0"):
            files[dtype] = str(root / f"m-{dtype}.gguf")
            lm.save_gguf(files[dtype], dtype, tokenizer=tokenizer)
        out[kind] = (lm, str(root / "hf"), files)
    return out


@pytest.mark.parametrize("kind", ["qwen2", "llama_untied"])
def test_export_round_trip_through_transformers(exported, tokenizer, kind):
    lm, hf_dir, files = exported[kind]
    batch = batch_for(len(tokenizer))
    ours = np.asarray(lm.logits(*batch))
    original = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval().state_dict()
    f32 = hf_from_gguf(files["f32"])
    for name, tensor in f32.state_dict().items():
        torch.testing.assert_close(tensor, original[name], rtol=0, atol=0, msg=name)
    assert max_abs_diff_real(ours, reference_logits(f32, *batch), batch[3]) <= 1e-4
    real = batch[3].astype(bool)
    scale = np.max(np.abs(ours[real]))
    for dtype, tolerance in (("f16", 1e-2), ("bf16", 3e-2), ("q8_0", 5e-2)):
        theirs = reference_logits(hf_from_gguf(files[dtype]), *batch)
        assert max_abs_diff_real(ours, theirs, batch[3]) <= tolerance * scale, dtype
    for dtype in ("f32", "q8_0"):
        back = from_pretrained(files[dtype])
        assert back.config == lm.config
        theirs = reference_logits(hf_from_gguf(files[dtype]), *batch)
        assert max_abs_diff_real(back.logits(*batch), theirs, batch[3]) <= 1e-4, dtype


def test_exported_tokenizer_reads_back(exported, tokenizer):
    from plad_jax.models.hf import load_tokenizer

    tok = load_tokenizer(exported["qwen2"][2]["f16"])
    for text in TEXTS[:4]:
        assert tok(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_export_refuses_what_gguf_cannot_say(tmp_path, tokenizer):
    from plad_jax.models import init_model

    lm = init_model(
        {
            "model_type": "gpt_neo",
            "vocab_size": 64,
            "hidden_size": 16,
            "num_layers": 2,
            "num_heads": 4,
            "attention_types": [[["global", "local"], 1]],
            "max_position_embeddings": 32,
        }
    )
    with pytest.raises(CheckpointError, match="GGUF export supports"):
        lm.save_gguf(str(tmp_path / "x.gguf"), "f16")
    assert not os.path.exists(tmp_path / "x.gguf")


# -- bad input: one line, exit 2, before any work --------------------------------------------------


def run_cli(tmp_path, capsys, *sets):
    sets += tuple(f"{s.split('.')[0]}.init=none" for s in sets if ".path=" in s)  # demo: init
    argv = ["--config", "demo", "--run-dir", str(tmp_path / "run")]
    code = launch.main(argv + [a for s in sets for a in ("--set", s)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "run" / "config.json")
    return err


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory, tokenizer):
    return write_gguf(
        tiny_model("llama_tied", len(tokenizer), layers=2),
        tmp_path_factory.mktemp("good") / "m.gguf",
        "F32",
        tokenizer,
    )


def test_cli_truncated_gguf(tmp_path, capsys, good_gguf):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(open(good_gguf, "rb").read()[:3000])
    err = run_cli(tmp_path, capsys, f"teacher.path={cut}")
    assert "truncated or corrupt GGUF file" in err and "teacher.path" in err


def test_cli_unknown_architecture(tmp_path, capsys, tokenizer):
    model = tiny_model("llama_tied", len(tokenizer))
    path = write_gguf(model, tmp_path / "m.gguf", "F32", tokenizer, arch="falcon")
    err = run_cli(tmp_path, capsys, f"student.path={path}")
    assert "GGUF architecture 'falcon' is not supported" in err


def test_cli_unsupported_quant_type(tmp_path, capsys, tokenizer):
    model = tiny_model("llama_tied", len(tokenizer), hidden=256, inter=256, layers=1)
    path = write_q2k(model, tmp_path, tokenizer)
    err = run_cli(tmp_path, capsys, f"teacher.path={path}")
    assert "stored as Q2_K, which plad_jax does not read" in err


def write_q2k(model, folder, tok):
    """Like `write_gguf` at F32, but blk.0.ffn_up as Q2_K (zero bytes: only its type matters)."""
    reader = gguf.GGUFReader(write_gguf(model, folder / "f32.gguf", "F32", tok))
    path = str(folder / "q2k.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in reader.tensors:
        if t.name == "blk.0.ffn_up.weight":
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q2_K]
            raw = np.zeros((int(t.shape[1]), int(t.shape[0]) // block * size), np.uint8)
            writer.add_tensor(t.name, raw, raw_dtype=gguf.GGMLQuantizationType.Q2_K)
        else:
            writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_cli_gguf_without_tokenizer(tmp_path, capsys, tokenizer):
    path = write_gguf(tiny_model("llama_tied", len(tokenizer)), tmp_path / "m.gguf", tok=None)
    assert "no tokenizer metadata" in run_cli(tmp_path, capsys, f"teacher.path={path}")


def test_cli_layers_out_of_range(tmp_path, capsys, good_gguf):
    err = run_cli(tmp_path, capsys, f"student.path={good_gguf}", "student.layers=0,2")
    assert "student.path: layers: entry 2 is out of range" in err


# -- the pipeline on a GGUF teacher and a student cut from it -------------------------------


@pytest.mark.slow
def test_pipeline_gguf_teacher_cut_student_gguf_export(tmp_path, tokenizer):
    """Nothing but one .gguf and a data file: the teacher is the file, the student its block 1, and
    the distilled student comes out as GGUF too (loadable by transformers and by plad_jax)."""
    from tests import tiny_run

    model = tiny_model("llama_untied", len(tokenizer))
    path = write_gguf(model, tmp_path / "teacher.gguf", "Q8_0", tokenizer)
    run = tmp_path / "run"
    sets = {
        "teacher.path": path,
        "student.path": path,
        "student.layers": "1",
        "data.task": "tldr",
        "data.path": tiny_run.write_tldr_jsonl(str(tmp_path / "tldr.jsonl")),
        "distill.export_gguf": "f16",
    }
    argv = ["--config", "tiny", "--run-dir", str(run)]
    argv += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    assert launch.main(argv) == 0
    exported = str(run / "distill" / "student-f16.gguf")
    assert json.load(open(run / "distill" / "DONE"))["gguf"] == exported
    distilled = from_pretrained(str(run / "distill" / "params"))
    assert distilled.config.num_layers == 1
    batch = batch_for(len(tokenizer))
    theirs = reference_logits(hf_from_gguf(exported), *batch)
    ours = np.asarray(distilled.logits(*batch))
    scale = np.max(np.abs(ours[batch[3].astype(bool)]))
    assert max_abs_diff_real(ours, theirs, batch[3]) <= 1e-2 * scale

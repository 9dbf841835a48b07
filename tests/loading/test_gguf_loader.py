"""GGUF loading: the bundled SmolLM2 against transformers' own GGUF loader, every quant type on
small synthetic files, and the errors a user sees for bad files."""

import functools
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from nanovllm.loading.gguf_loader import SUPPORTED_ARCHITECTURES, load_gguf_tokenizer, read_gguf_checkpoint
from nanovllm.loading.resolve import bundled_model_path

# Synthetic model: in_features are multiples of 256 so that every K-quant block fits.
HIDDEN, FFN, VOCAB, LAYERS, HEADS, KV_HEADS = 256, 512, 64, 2, 4, 2
QWEN3_HEAD_DIM = 128  # != HIDDEN // HEADS: head_dim must come from attention.key_length
ROPE_THETA, RMS_EPS, CONTEXT = 10000.0, 1e-6, 512

# Types gguf.quants can quantize -> allowed max |error| as a fraction of max |weight|
# (half a quantization step, or a whole one where the extreme value clips).
QUANTIZABLE_TOLERANCE = {
    QT.F32: 0.0, QT.F16: 1e-3, QT.BF16: 1e-2, QT.Q8_0: 1e-2,
    QT.Q5_1: 0.05, QT.Q5_0: 0.08, QT.Q4_1: 0.1, QT.Q4_0: 0.15,
}
# K-quants gguf can only dequantize: random blocks whose fp16 scale fields (byte offsets here) are set
# to sane values, checked against transformers' independent torch dequantizer.
K_QUANT_F16_FIELDS = {QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to llama Q/K rows (LlamaModel.permute)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_weights(arch: str, rng: np.random.Generator, tied: bool = False) -> dict[str, np.ndarray]:
    """GGUF name -> float32 weights in HF layout ([out_features, in_features])."""
    head_dim = QWEN3_HEAD_DIM if arch == "qwen3" else HIDDEN // HEADS
    q_rows, kv_rows = HEADS * head_dim, KV_HEADS * head_dim
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
    if not tied:
        shapes["output.weight"] = (VOCAB, HIDDEN)
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,), f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (q_rows, HIDDEN), f"blk.{i}.attn_k.weight": (kv_rows, HIDDEN),
            f"blk.{i}.attn_v.weight": (kv_rows, HIDDEN), f"blk.{i}.attn_output.weight": (HIDDEN, q_rows),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN), f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }
        if arch == "qwen2":
            shapes |= {f"blk.{i}.attn_q.bias": (q_rows,), f"blk.{i}.attn_k.bias": (kv_rows,),
                       f"blk.{i}.attn_v.bias": (kv_rows,)}
        if arch == "qwen3":
            shapes |= {f"blk.{i}.attn_q_norm.weight": (head_dim,), f"blk.{i}.attn_k_norm.weight": (head_dim,)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def write_gguf(path, arch: str, tensors: dict[str, tuple[np.ndarray, QT | None]], **metadata) -> str:
    """Write `tensors` ({name: (data, raw ggml type or None)}) with a minimal model header."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if arch == "qwen3":
        writer.add_key_length(QWEN3_HEAD_DIM)
        writer.add_value_length(QWEN3_HEAD_DIM)
    for key, value in metadata.items():
        getattr(writer, f"add_{key}")(value)
    for name, (data, raw_dtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def write_tiny_model(path, arch: str, qtype: QT = QT.F32, rng=None, tied: bool = False, **metadata):
    """A random-weight model whose 2-D weights are stored as `qtype` (llama Q/K permuted as llama.cpp
    does); returns (path, {gguf name: original float32 weights in HF layout})."""
    rng = rng or np.random.default_rng(0)
    weights = tiny_weights(arch, rng, tied)
    heads = {"attn_q": HEADS, "attn_k": KV_HEADS}
    tensors = {}
    for name, x in weights.items():
        stored, raw_dtype = x, None
        stem = name.split(".")[-2]
        if arch == "llama" and stem in heads:
            stored = llama_cpp_permute(stored, heads[stem])
        if x.ndim == 2:
            stored = gguf.quants.quantize(stored, qtype)
            raw_dtype = qtype if stored.dtype == np.uint8 else None
        tensors[name] = (stored, raw_dtype)
    return write_gguf(path, arch, tensors, **metadata), weights


def hf_name(gguf_name: str) -> str:
    """Independent spelling of the expected HF names, for the synthetic models."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if gguf_name in fixed:
        return fixed[gguf_name]
    _, layer, stem, suffix = gguf_name.split(".")
    module = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
              "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}[stem]
    return f"model.layers.{layer}.{module}.{suffix}"


# ----------------------------------------------------------------------------- bundled model


@pytest.fixture(scope="module")
def bundled():
    return read_gguf_checkpoint(bundled_model_path())


def test_bundled_config(bundled):
    cfg = bundled.hf_config
    assert cfg.architectures == ["LlamaForCausalLM"] and cfg.model_type == "llama"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.max_position_embeddings == 8192
    assert cfg.tie_word_embeddings is True
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.dtype == torch.float32
    assert "<|im_start|>" in bundled.chat_template


@pytest.mark.slow  # transformers' GGUF loader: ~12 s on 2 idle cores
def test_bundled_tensors_match_transformers(bundled, monkeypatch):
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers rebuilds gguf's (pure) name table once per submodule, ~400 times: memoize it.
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
    # What from_pretrained(dir, gguf_file=...) runs for llama; calling it directly spares the
    # `accelerate` dependency from_pretrained insists on for GGUF files.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(bundled.hf_config)
    reference = load_gguf_checkpoint(bundled.path, return_tensors=True, model_to_load=model)
    expected = reference["tensors"]
    ours = dict(bundled.iter_tensors())

    assert sorted(ours) == sorted(expected) and len(ours) == 272
    assert "lm_head.weight" not in ours  # tied
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == expected[name].shape, name
        torch.testing.assert_close(tensor, expected[name].float(), rtol=1e-6, atol=1e-6, msg=name)
    assert ours["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)  # [out, in]
    assert ours["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)
    # the config transformers derives from the same file
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(bundled.hf_config, key) == reference["config"][key], key


def test_bundled_tokenizer():
    tokenizer = load_gguf_tokenizer(bundled_model_path())
    text = "The capital of France is"
    ids = tokenizer(text)["input_ids"]
    assert ids == [504, 3575, 282, 4649, 314]  # SmolLM2 adds no BOS
    assert tokenizer.decode(ids) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"

    tokenizer.chat_template = "edited"  # each call hands out its own copy
    assert load_gguf_tokenizer(bundled_model_path()).chat_template.startswith("{% for message")


# ----------------------------------------------------------------------------- synthetic files


@pytest.mark.parametrize("qtype", list(QUANTIZABLE_TOLERANCE), ids=lambda q: q.name)
def test_dequantize_quantizable_types(tmp_path, qtype):
    path, weights = write_tiny_model(tmp_path / "m.gguf", "qwen2", qtype)
    ours = dict(read_gguf_checkpoint(path).iter_tensors())

    assert sorted(ours) == sorted(hf_name(n) for n in weights)
    for name, x in weights.items():
        out = ours[hf_name(name)]
        assert out.dtype == torch.float32 and tuple(out.shape) == x.shape, name
        error = np.abs(out.numpy() - x).max()
        assert error <= QUANTIZABLE_TOLERANCE[qtype] * np.abs(x).max(), (name, error)


def random_k_blocks(rows: int, cols: int, qtype: QT, rng: np.random.Generator) -> np.ndarray:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for offset in K_QUANT_F16_FIELDS[qtype]:
        scales = rng.uniform(1e-3, 1e-2, size=len(blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)  # [rows, bytes per row]


@pytest.mark.parametrize("qtype", list(K_QUANT_F16_FIELDS), ids=lambda q: q.name)
def test_dequantize_k_quants_match_transformers(tmp_path, qtype):
    reference = pytest.importorskip("transformers.integrations.gguf.dequant")
    rng = np.random.default_rng(1)
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output.weight": (VOCAB, HIDDEN),
              "blk.0.ffn_down.weight": (HIDDEN, FFN), "blk.1.attn_q.weight": (HIDDEN, HIDDEN)}
    raw = {name: random_k_blocks(*shape, qtype, rng) for name, shape in shapes.items()}
    path = write_gguf(tmp_path / "k.gguf", "qwen2", {name: (data, qtype) for name, data in raw.items()})
    ours = dict(read_gguf_checkpoint(path).iter_tensors())

    assert sorted(ours) == sorted(hf_name(n) for n in shapes)
    for name, shape in shapes.items():
        expected = reference.dequantize(torch.from_numpy(raw[name]), int(qtype)).reshape(shape)
        assert expected.abs().max() > 0
        torch.testing.assert_close(ours[hf_name(name)], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_llama_qk_permutation_is_undone(tmp_path):
    path, weights = write_tiny_model(tmp_path / "llama.gguf", "llama", QT.F32)
    ckpt = read_gguf_checkpoint(path)
    ours = dict(ckpt.iter_tensors())
    for name, x in weights.items():  # F32: exact, Q/K included
        assert torch.equal(ours[hf_name(name)], torch.from_numpy(x)), name
    cfg = ckpt.hf_config
    assert cfg.architectures == ["LlamaForCausalLM"] and cfg.tie_word_embeddings is False
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (HEADS, KV_HEADS, HIDDEN // HEADS)
    assert cfg.max_position_embeddings == CONTEXT and cfg.vocab_size == VOCAB


def test_qwen3_names_and_head_dim(tmp_path):
    path, weights = write_tiny_model(tmp_path / "qwen3.gguf", "qwen3", QT.Q8_0, tied=True)
    ckpt = read_gguf_checkpoint(path)
    cfg = ckpt.hf_config
    assert cfg.architectures == ["Qwen3ForCausalLM"] and cfg.model_type == "qwen3"
    assert cfg.head_dim == QWEN3_HEAD_DIM and cfg.tie_word_embeddings is True
    names = [name for name, _ in ckpt.iter_tensors()]
    assert "model.layers.1.self_attn.q_norm.weight" in names and "model.layers.1.self_attn.k_norm.weight" in names
    assert "lm_head.weight" not in names and len(names) == len(weights)


def test_qwen2_biases_and_rope_scaling(tmp_path):
    path, weights = write_tiny_model(tmp_path / "qwen2.gguf", "qwen2", QT.F16,
                                     rope_scaling_type=gguf.RopeScalingType.LINEAR, rope_scaling_factor=4.0)
    ckpt = read_gguf_checkpoint(path)
    assert ckpt.hf_config.architectures == ["Qwen2ForCausalLM"]
    assert ckpt.hf_config.rope_parameters["rope_type"] == "linear"
    assert ckpt.hf_config.rope_parameters["factor"] == 4.0
    tensors = dict(ckpt.iter_tensors())
    bias = weights["blk.1.attn_k.bias"]  # 1-D, stored F32 whatever the weight type
    assert torch.equal(tensors["model.layers.1.self_attn.k_proj.bias"], torch.from_numpy(bias))


def test_edited_file_is_read_again(tmp_path):
    path, _ = write_tiny_model(tmp_path / "m.gguf", "llama", QT.F32)
    assert read_gguf_checkpoint(path).hf_config.model_type == "llama"
    write_tiny_model(tmp_path / "m.gguf", "qwen3", QT.Q8_0)  # new size and mtime
    assert read_gguf_checkpoint(path).hf_config.model_type == "qwen3"


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf_checkpoint(missing)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf_tokenizer(missing)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        read_gguf_checkpoint(tmp_path)


@pytest.mark.parametrize("prefix", [b"", b"GGUF\x03\x00\x00\x00"], ids=["random", "magic-then-random"])
def test_random_bytes(tmp_path, prefix):
    path = tmp_path / "junk.gguf"
    path.write_bytes(prefix + np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"junk\.gguf: not a valid GGUF file"):
        read_gguf_checkpoint(path)


def test_empty_file_and_bad_version(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.gguf: not a valid GGUF file"):
        read_gguf_checkpoint(empty)
    path, _ = write_tiny_model(tmp_path / "v9.gguf", "llama")
    data = bytearray(open(path, "rb").read())
    data[4:8] = (9).to_bytes(4, "little")
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=r"v9\.gguf: not a valid GGUF file \(version 9"):
        read_gguf_checkpoint(path)


@pytest.mark.parametrize("keep", [10, 100, 0.1, 0.5, -1], ids=lambda k: f"keep={k}")
def test_truncated_file(tmp_path, keep):
    path, _ = write_tiny_model(tmp_path / "whole.gguf", "llama", QT.Q4_0)
    data = open(path, "rb").read()
    cut = keep if isinstance(keep, int) and keep > 0 else len(data) + keep if keep < 0 else int(len(data) * keep)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=r"truncated\.gguf: not a valid GGUF file"):
        read_gguf_checkpoint(truncated)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": (np.zeros((4, 32), np.float32), None)})
    with pytest.raises(ValueError, match=r"gpt2\.gguf: GGUF architecture 'gpt2' is not supported") as info:
        read_gguf_checkpoint(path)
    assert all(arch in str(info.value) for arch in SUPPORTED_ARCHITECTURES)


def test_unsupported_tensor_type(tmp_path):
    tensors = {"token_embd.weight": (np.zeros((VOCAB, HIDDEN), np.float64), None)}  # F64: no dequantizer
    path = write_gguf(tmp_path / "f64.gguf", "llama", tensors)
    with pytest.raises(ValueError, match=r"f64\.gguf: tensor 'token_embd\.weight' has type F64"):
        read_gguf_checkpoint(path)


def test_unsupported_tensor_name(tmp_path):
    # llama-3 style rope scaling: frequencies llama.cpp precomputed; silently dropping them would be wrong
    tensors = {"rope_freqs.weight": (np.ones(HIDDEN // HEADS // 2, np.float32), None)}
    path = write_gguf(tmp_path / "rope.gguf", "llama", tensors)
    with pytest.raises(ValueError, match=r"rope\.gguf: tensor 'rope_freqs\.weight'"):
        read_gguf_checkpoint(path)


def test_bundled_path_points_at_the_file():
    path = bundled_model_path()
    assert os.path.isfile(path) and path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")

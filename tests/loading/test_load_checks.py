"""Broken model files are refused at load with a message naming the file and the field or tensor:
key config fields (num_attention_heads: 0, num_hidden_layers: -1, ...) and NaN / Inf weights."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from safetensors.torch import load_file, save_file

from nanovllm import LLM
from nanovllm.loading.gguf_loader import read_gguf_checkpoint
from nanovllm.loading.weights import FiniteCheck
from test_gguf_loader import write_tiny_model


def _copy_with_config(src: str, dst, **changes) -> str:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.mark.parametrize("changes, words", [
    (dict(num_attention_heads=0), "num_attention_heads=0 must be a positive integer"),
    (dict(num_hidden_layers=-1), "num_hidden_layers=-1 must be a positive integer"),
    (dict(hidden_size=0), "hidden_size=0 must be a positive integer"),
    (dict(vocab_size=None), "vocab_size=None is missing"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3 must divide num_attention_heads=4"),
    (dict(head_dim=0), "head_dim=0 must be a positive integer"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps=-1e-06 must be a positive number"),
    (dict(num_attention_heads="4"), "num_attention_heads='4' must be a positive integer"),
])
def test_bad_config_field_is_named(tiny_model_factory, tmp_path, changes, words):
    path = _copy_with_config(tiny_model_factory("llama"), tmp_path / "m", **changes)
    with pytest.raises(ValueError) as info:
        LLM(path, skip_tokenizer_init=True, device="cpu")
    assert words in str(info.value) and "config.json" in str(info.value)


def test_cli_reports_a_bad_config_in_one_line(tiny_model_factory, tmp_path):
    path = _copy_with_config(tiny_model_factory("llama"), tmp_path / "m", num_attention_heads=0)
    r = subprocess.run([sys.executable, "-m", "nanovllm.cli.main", "generate", "hi", "--model", path, "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "num_attention_heads=0" in r.stderr, r.stderr


def test_gguf_with_zero_heads_is_named(tmp_path):
    path, _ = write_tiny_model(tmp_path / "m.gguf", "llama", head_count=0)
    with pytest.raises(ValueError, match="num_attention_heads=0 must be a positive integer"):
        LLM(path, skip_tokenizer_init=True, device="cpu")


# ----------------------------------------------------------------------------- NaN / Inf weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_finite_check_finds_the_tensor(dtype, bad):
    check = FiniteCheck()
    tensors = {f"w{i}": torch.randn(37, 11).to(dtype) for i in range(4)}
    tensors["ids"] = torch.arange(10)  # integer tensors are not scanned
    if bad is not None:
        tensors["w2"][5, 3] = bad
    for name, t in tensors.items():
        check.add(name, t, "file.safetensors")
    assert check.bad_tensors() == ([] if bad is None else ["file.safetensors: tensor 'w2'"])


def test_safetensors_with_nan_is_refused(tiny_model_factory, tmp_path):
    shutil.copytree(tiny_model_factory("llama"), tmp_path / "m")
    f = next((tmp_path / "m").glob("*.safetensors"))
    tensors = load_file(str(f))
    tensors["model.layers.1.self_attn.k_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{f.name}: tensor 'model.layers.1.self_attn.k_proj.weight' holds NaN"):
        LLM(str(tmp_path / "m"), skip_tokenizer_init=True, device="cpu")


def test_gguf_with_garbled_block_is_refused(tmp_path):
    """A Q4_1 block whose fp16 scale bytes are garbage (0xFFFF is an fp16 NaN) dequantizes to NaNs."""
    path, _ = write_tiny_model(tmp_path / "m.gguf", "llama", qtype=QT.Q4_1)
    victim = next(t for t in read_gguf_checkpoint(path)._tensors if t.hf_name == "model.layers.0.mlp.up_proj.weight")
    data = bytearray(open(path, "rb").read())
    data[victim.start : victim.start + 2] = b"\xff\xff"
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="tensor 'model.layers.0.mlp.up_proj.weight' holds NaN or Inf"):
        LLM(path, skip_tokenizer_init=True, device="cpu")
    assert np.isnan(np.frombuffer(bytes(data[victim.start : victim.start + 2]), dtype=np.float16)[0])

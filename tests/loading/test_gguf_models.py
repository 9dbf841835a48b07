"""GGUF files of the newer families (Gemma 2 / 3, Qwen3-MoE, Mixtral as llama with experts)
written the way llama.cpp's converter writes them, loaded by nanovllm: the same config (as the
models read it) and exactly the same tensors as the HF directory of the same weights (whose
HF parity tests/models/test_model_families.py checks), and for one of them the same output."""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.loading.gguf_loader import read_gguf_checkpoint
from tiny_models import FAMILY_CONFIGS

GGUF_ARCH = {"gemma2": "gemma2", "gemma3": "gemma3", "qwen3_moe": "qwen3moe", "mixtral": "llama"}
LAYER_STEMS = {  # HF module -> llama.cpp stem (the inverse of the loader's maps, spelled out)
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",
}
GEMMA_STEMS = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"}
EXPERT_STEMS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
                "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
PER_EXPERT_STEMS = {"w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down"}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute of Q/K rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_tensors(name: str, state: dict[str, torch.Tensor], cfg, stacked: bool) -> dict[str, np.ndarray]:
    arch = GGUF_ARCH[name]
    gemma = arch.startswith("gemma")
    stems = {**LAYER_STEMS, **(GEMMA_STEMS if gemma else {"post_attention_layernorm": "ffn_norm"})}
    out, experts = {}, {}
    for key, t in state.items():
        x = t.float().numpy()
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
        if key in fixed:
            out[fixed[key]] = x + 1 if gemma and key == "model.norm.weight" else x
            continue
        layer, module = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", key).groups()
        if m := re.fullmatch(r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)", module):
            experts.setdefault((layer, m[2]), {})[int(m[1])] = x
            continue
        stem = stems[module]
        if arch == "llama" and stem in ("attn_q", "attn_k"):
            x = permute(x, cfg.num_attention_heads if stem == "attn_q" else cfg.num_key_value_heads)
        if gemma and module.endswith("norm"):
            x = x + 1  # llama.cpp stores Gemma's norms as 1 + w
        out[f"blk.{layer}.{stem}.weight"] = x
    for (layer, proj), per_expert in experts.items():
        if stacked:
            out[f"blk.{layer}.{EXPERT_STEMS[proj]}.weight"] = np.stack([per_expert[e] for e in sorted(per_expert)])
        else:  # older Mixtral files: one tensor per expert
            for e, x in per_expert.items():
                out[f"blk.{layer}.{PER_EXPERT_STEMS[proj]}.{e}.weight"] = x
    return out


def write_gguf(path, name: str, cfg, tensors: dict[str, np.ndarray]) -> str:
    arch = GGUF_ARCH[name]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if arch == "gemma2":
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_sliding_window(cfg.sliding_window)
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_attention_scale(cfg.query_pre_attn_scalar**-0.5)
    elif arch == "gemma3":
        full = cfg.rope_parameters["full_attention"]
        w.add_rope_freq_base(full["rope_theta"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(full["factor"])
        w.add_sliding_window(cfg.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    else:
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_expert_count(cfg.num_experts if arch == "qwen3moe" else cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if arch == "qwen3moe":
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        elif cfg.sliding_window:
            w.add_sliding_window(cfg.sliding_window)
    for tensor_name, x in tensors.items():
        w.add_tensor(tensor_name, np.ascontiguousarray(x, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def generate(model: str, vocab: int):
    llm = LLM(model, skip_tokenizer_init=True, device="cpu", dtype="float32", max_model_len=128,
              cpu_weight_format="fp32")  # GGUF files would default to fp16-packed GEMMs
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (4, 21)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    return [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]


def model_facts(cfg) -> dict:
    """Everything the model classes read from a config, as nanovllm reads it."""
    from nanovllm.layers.rotary import SLIDING_ATTENTION, rope_settings
    from nanovllm.models.llama import head_dim_of, layer_sliding_window

    keys = ("architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings", "query_pre_attn_scalar",
            "attn_logit_softcapping", "final_logit_softcapping", "num_experts", "num_local_experts",
            "num_experts_per_tok", "moe_intermediate_size", "mlp_only_layers", "norm_topk_prob")
    facts = {k: getattr(cfg, k, None) for k in keys}
    facts["head_dim"] = head_dim_of(cfg)
    facts["windows"] = [layer_sliding_window(cfg, i) for i in range(cfg.num_hidden_layers)]
    facts["rope"] = (rope_settings(cfg), rope_settings(cfg, SLIDING_ATTENTION))
    facts["eps"] = round(cfg.rms_norm_eps, 9)
    return facts


CASES = [("gemma2", True), ("gemma3", True), ("qwen3_moe", True), ("mixtral", True), ("mixtral", False)]


def write_case(name, stacked, tiny_model_factory, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    hf_dir = tiny_model_factory(name)
    cfg = AutoConfig.from_pretrained(hf_dir)
    state = load_file(f"{hf_dir}/model.safetensors")
    path = write_gguf(tmp_path / f"{name}.gguf", name, cfg, to_gguf_tensors(name, state, cfg, stacked))
    return hf_dir, cfg, state, path


@pytest.mark.parametrize("name,stacked", CASES, ids=["gemma2", "gemma3", "qwen3moe", "mixtral-stacked",
                                                     "mixtral-per-expert"])
def test_gguf_reads_as_the_hf_model(name, stacked, tiny_model_factory, tmp_path):
    """Same config (as the models read it) and the same tensors, exactly: llama.cpp's changes undone."""
    _, cfg, state, path = write_case(name, stacked, tiny_model_factory, tmp_path)
    ckpt = read_gguf_checkpoint(path)
    assert model_facts(ckpt.hf_config) == model_facts(cfg)
    tensors = dict(ckpt.iter_tensors())
    expected = {k: v for k, v in state.items() if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    assert sorted(tensors) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(tensors[key], value.float(), atol=1e-6, rtol=0, msg=key)


def test_gguf_generates_what_the_hf_directory_generates(tiny_model_factory, tmp_path):
    hf_dir, cfg, _, path = write_case("gemma3", True, tiny_model_factory, tmp_path)
    for a, b in zip(generate(path, cfg.vocab_size), generate(hf_dir, cfg.vocab_size)):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.keys() == y.keys()
            assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)

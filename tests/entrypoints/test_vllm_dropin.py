"""vLLM's offline API as its example scripts use it: EngineArgs + LLM(**vars(args)),
get_default_sampling_params, SamplingParams changed after construction, chat templates,
and the command line's flag checks (before any model loads)."""

from __future__ import annotations

import argparse
import csv
import logging
import os
import subprocess
import sys

import pytest

from nanovllm import LLM, EngineArgs, SamplingParams
from nanovllm.utils import FlexibleArgumentParser

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL_TEMPLATE = os.path.join(REPO, "examples", "tool_chat_template_chatml.jinja")


def test_engine_args_cli_round_trip_into_llm(tiny_model_factory):
    """vLLM's examples/offline_inference/basic/generate.py pattern."""
    parser = FlexibleArgumentParser()
    assert EngineArgs.add_cli_args(parser) is parser
    parser.set_defaults(model=tiny_model_factory("llama"))
    sampling = parser.add_argument_group("Sampling parameters")
    sampling.add_argument("--max-tokens", type=int)
    args = vars(parser.parse_args(["--max_model_len", "64", "--device", "cpu", "--skip-tokenizer-init",
                                   "--max-num-seqs", "4", "--no-enable-prefix-caching", "--max-tokens", "3"]))
    max_tokens = args.pop("max_tokens")
    llm = LLM(**args)
    assert llm.config.max_model_len == 64 and llm.config.max_num_seqs == 4 and not llm.config.enable_prefix_caching
    params = llm.get_default_sampling_params()
    params.max_tokens = max_tokens  # vLLM's examples adjust the defaults in place
    params.temperature = 0.0
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    assert EngineArgs.from_cli_args(argparse.Namespace(**args)).create_engine_config() == llm.config


def test_vllm_only_arguments(tiny_model_factory, caplog):
    kw = dict(model=tiny_model_factory("llama"), skip_tokenizer_init=True, device="cpu", max_model_len=64)
    with caplog.at_level(logging.WARNING, logger="nanovllm"):
        LLM(**kw, swap_space=8, disable_log_stats=True, tensor_parallel_size=1, quantization=None,
            trust_remote_code=True, download_dir=None, enable_lora=False)
    warned = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert len(warned) == 2 and any("swap_space=8" in w for w in warned)  # one line per changed argument
    for bad, words in ((dict(distributed_executor_backend="ray"), "distributed_executor_backend='ray'"),
                       (dict(quantization="awq"), "quantization='awq'"),
                       (dict(pipeline_parallel_size=2), "pipeline_parallel_size"),
                       (dict(enable_lora=True), "enable_lora")):
        with pytest.raises(ValueError, match=words):
            LLM(**kw, **bad)
    with pytest.raises(TypeError, match="unknown engine argument 'frobnicate'"):
        LLM(**kw, frobnicate=1)


def test_sampling_params_checked_when_used(tiny_model_factory):
    llm = LLM(tiny_model_factory("llama"), skip_tokenizer_init=True, device="cpu", max_model_len=64)
    params = SamplingParams(max_tokens=4)
    params.temperature = -1.0
    with pytest.raises(ValueError, match="temperature"):
        llm.generate([[1, 2, 3]], params, use_tqdm=False)
    params.temperature, params.stop = 0.0, "x"
    assert llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert params.stop == "x"  # the engine verified and ran its own copy; the caller's object is as it was


def test_chat_template_and_kwargs(bundled_llm):
    template = "{% for m in messages %}<{{ m.role }}:{{ m.content }}:{{ style }}>{% endfor %}"
    out = bundled_llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=1), use_tqdm=False,
                           chat_template=template, chat_template_kwargs={"style": "terse"})
    assert out[0].prompt == "<user:Hi:terse>"
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Look a word up",
                                               "parameters": {"type": "object", "properties": {}}}}]
    prompt = bundled_llm.apply_chat_template([{"role": "user", "content": "Hi"}], chat_template=TOOL_TEMPLATE,
                                             tools=tools)["prompt"]
    assert "<tools>" in prompt and '"name": "lookup"' in prompt
    with pytest.raises(ValueError, match="text-only"):
        bundled_llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanovllm.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("args, words", [
    (("serve", "--max-modle-len", "64"), ("usage: nanovllm serve", "--max-modle-len", "did you mean --max-model-len")),
    (("generate", "hi", "--temprature", "0"), ("usage: nanovllm generate", "did you mean --temperature")),
    (("serve", "--max-num-seqs", "0"), ("usage: nanovllm serve", "positive integer")),
    (("serve", "--port", "70000"), ("usage: nanovllm serve", "70000")),
    (("serve", "--gpu-memory-utilization", "2"), ("(0, 1]",)),
    (("serve", "-tp", "2"), ("tensor_parallel_size=2",)),
    (("serve", "--chat-template", "/no/such/template.jinja"), ("no such file",)),
    (("serve", "--enable-auto-tool-choice"), ("--tool-call-parser",)),
    (("serve", "--allowed-methods", "GET"), ("--allowed-origins",)),
    (("bench", "throughput", "--model", "x", "--max-input-len", "50"), ("usage: nanovllm bench throughput",
                                                                       "--max-input-len 50", "minimum of 100")),
])
def test_bad_flags_print_the_subcommand_usage_before_loading(args, words):
    out = _cli(*args)
    assert out.returncode == 2, out.stderr
    for w in words:
        assert w in out.stderr, out.stderr
    assert "KV cache" not in out.stderr  # no engine was built


def test_bench_throughput_progress_and_cuda_graphs_column(tiny_model_factory, tmp_path):
    import json

    config = json.load(open(os.path.join(tiny_model_factory("llama"), "config.json")))
    config["vocab_size"] = 10240  # the workload draws token ids up to 10000; random (dummy) weights
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    csv_path = tmp_path / "t.csv"
    out = _cli("bench", "throughput", "--model", str(tmp_path / "model"), "--num-seqs", "2",
               "--max-input-len", "100", "--max-output-len", "100", "--max-model-len", "512", "--csv", str(csv_path),
               timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Processed prompts" in out.stderr  # tqdm's progress bar
    rows = list(csv.DictReader(open(csv_path)))
    assert rows[-1]["cuda_graphs"] == "False"  # CPU: no graphs, whatever --enforce-eager says


def test_engine_args_cover_every_engine_config_field():
    """LLM(...) goes through EngineArgs, which refuses unknown names: a new EngineConfig field
    must be an EngineArgs field too, or LLM(new_field=...) would be a TypeError."""
    from dataclasses import fields

    from nanovllm.config import EngineConfig
    from nanovllm.engine.arg_utils import EngineArgs

    missing = {f.name for f in fields(EngineConfig)} - {f.name for f in fields(EngineArgs)}
    assert not missing, f"add these to EngineArgs (nanovllm/engine/arg_utils.py): {sorted(missing)}"

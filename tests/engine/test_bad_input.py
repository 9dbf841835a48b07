"""Bad input raises ValueError/TypeError saying what to change; the engine keeps serving."""

import pytest

from nanovllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_factory):
    return LLM(tiny_model_factory("llama"), skip_tokenizer_init=True, device="cpu", max_model_len=64)


GOOD = {"prompt_token_ids": [5, 6, 7]}


@pytest.mark.parametrize("prompt,exc,words", [
    ({"prompt_token_ids": []}, ValueError, "empty"),
    ({"prompt_token_ids": [1, 5000]}, ValueError, "vocabulary"),
    ({"prompt_token_ids": [-1]}, ValueError, "vocabulary"),
    ({"prompt_token_ids": list(range(64))}, ValueError, "max_model_len"),
    ({"prompt_token_ids": [1.5]}, TypeError, "ints"),
    ("some text", ValueError, "skip_tokenizer_init"),
    (42, TypeError, "prompt"),
    ({"tokens": [1]}, TypeError, "prompt_token_ids"),
])
def test_bad_prompts_are_refused_and_engine_keeps_serving(llm, prompt, exc, words):
    with pytest.raises(exc, match=words):
        llm.generate([GOOD, prompt], SamplingParams(max_tokens=4), use_tqdm=False)
    out = llm.generate([GOOD], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs,exc,field", [
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(max_tokens=-3), ValueError, "max_tokens"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_k=-2), ValueError, "top_k"),
    (dict(n=0), ValueError, "n="),
    (dict(logprobs=100), ValueError, "logprobs"),
    (dict(stop=[1, 2]), TypeError, "stop"),
    (dict(max_tokens="5"), TypeError, "max_tokens"),
])
def test_bad_sampling_params_name_the_field(kwargs, exc, field):
    with pytest.raises(exc, match=field):
        SamplingParams(**kwargs)


def test_unknown_sampling_field_is_a_type_error():
    with pytest.raises(TypeError):
        SamplingParams(temprature=0.5)
    with pytest.raises(TypeError, match="unknown sampling parameter"):
        SamplingParams.from_dict({"temprature": 0.5})


def test_request_that_can_never_fit_is_refused(tiny_model_factory):
    llm = LLM(tiny_model_factory("llama"), skip_tokenizer_init=True, device="cpu", max_model_len=256,
              num_kv_blocks=4)
    with pytest.raises(ValueError, match="KV cache blocks"):
        llm.generate([{"prompt_token_ids": [1] * 40}], SamplingParams(max_tokens=100), use_tqdm=False)


def test_stop_token_outside_vocab_is_refused(llm):
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([GOOD], SamplingParams(stop_token_ids=[10**6]), use_tqdm=False)


@pytest.mark.parametrize("model,words", [
    ("/no/such/model/dir", "not found"),
    ("not-a-repo-id-xyz/none", "not found"),
])
def test_unknown_model_path_is_a_clear_error(model, words):
    with pytest.raises(ValueError, match=words):
        LLM(model)


def test_unsupported_architecture_lists_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"}')
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(str(tmp_path), skip_tokenizer_init=True, device="cpu")


def test_wrong_tensor_shape_names_file_and_tensor(tiny_model_factory, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src = tiny_model_factory("llama")
    shutil.copytree(src, tmp_path / "m")
    f = next((tmp_path / "m").glob("*.safetensors"))
    tensors = load_file(str(f))
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"up_proj.*expected shape"):
        LLM(str(tmp_path / "m"), skip_tokenizer_init=True, device="cpu")


def test_corrupt_safetensors_names_the_file(tiny_model_factory, tmp_path):
    import shutil

    src = tiny_model_factory("llama")
    shutil.copytree(src, tmp_path / "m")
    f = next((tmp_path / "m").glob("*.safetensors"))
    f.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=f.name):
        LLM(str(tmp_path / "m"), skip_tokenizer_init=True, device="cpu")


# ----------------------------------------------------------------------------- limits and strictness (#19)


@pytest.mark.parametrize("kwargs, words", [
    (dict(stop=["x"] * 33), "at most 32"),
    (dict(stop=["a" * 1500, "b" * 549]), "2049 characters"),
    (dict(stop=["ok", "\ud800"]), "surrogate"),
    (dict(stop_token_ids=list(range(1025))), "at most 1024"),
])
def test_stop_limits(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**kwargs)
    SamplingParams(stop=["x"] * 32)  # the limits themselves are fine
    SamplingParams(stop=["a" * 2048])


def test_explicit_max_tokens_beyond_context_is_refused_default_is_clamped(llm):
    prompt = {"prompt_token_ids": [5] * 60}  # max_model_len 64: room for 4
    with pytest.raises(ValueError, match="max_tokens=10 does not fit.*at most 4") as info:
        llm.generate([prompt], SamplingParams(max_tokens=10), use_tqdm=False)
    assert info.value.param == "max_tokens"
    with pytest.raises(ValueError, match="max_tokens=16 does not fit"):  # an explicit 16 is no default
        llm.generate([prompt], SamplingParams(max_tokens=16), use_tqdm=False)
    # the default (16) and None are clamped to the room left, also through replace()
    for params in (SamplingParams(ignore_eos=True), SamplingParams(ignore_eos=True).replace(seed=1),
                   SamplingParams(max_tokens=None, ignore_eos=True)):
        out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) == 4 and out.finish_reason == "length"
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks


def test_max_model_len_beyond_the_model_needs_an_opt_in(tiny_model_factory):
    path = tiny_model_factory("llama")  # max_position_embeddings 512
    with pytest.raises(ValueError, match="max_model_len=1000000 is longer than the model's max_position_embeddings=512"):
        LLM(path, skip_tokenizer_init=True, device="cpu", max_model_len=10**6)
    with pytest.raises(TypeError, match="allow_long_max_model_len"):
        LLM(path, skip_tokenizer_init=True, device="cpu", allow_long_max_model_len="yes")
    llm = LLM(path, skip_tokenizer_init=True, device="cpu", max_model_len=1024, allow_long_max_model_len=True,
              num_kv_blocks=8)
    assert llm.engine.max_model_len == 1024


@pytest.mark.parametrize("prompt, params, param", [
    ({"prompt_token_ids": [1, 5000]}, SamplingParams(), "prompt"),
    ({"prompt_token_ids": list(range(64))}, SamplingParams(), "prompt"),
    (GOOD, SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
    (GOOD, SamplingParams(logit_bias={10**6: 1.0}), "logit_bias"),
    (GOOD, SamplingParams(n=300), "n"),
])
def test_engine_errors_name_the_field(llm, prompt, params, param):
    with pytest.raises((ValueError, TypeError)) as info:
        llm.generate([prompt], params, use_tqdm=False)
    assert info.value.param == param


@pytest.mark.parametrize("bad, words", [
    ("temperature=0", "got str 'temperature=0'; e.g. SamplingParams"),
    ({"temperature": 0}, "got dict.*SamplingParams.from_dict"),
    (42, "got int 42"),
    ([SamplingParams(), "x"], "got str 'x'"),
])
def test_sampling_params_of_the_wrong_type(llm, bad, words):
    with pytest.raises(TypeError, match=f"sampling_params must be .*{words}"):
        llm.generate([GOOD], bad, use_tqdm=False)


def test_stream_with_a_wrong_argument(llm):
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams, got str 'x'"):
        next(llm.stream(GOOD, "x"))
    assert not llm.engine.has_unfinished_requests()


def test_prompt_above_the_token_budget_is_refused_without_chunked_prefill(tiny_model_factory):
    """Without chunked prefill a prompt must fit one step's budget whole; a longer one used to
    wait in the queue forever (and block everything behind it)."""
    llm = LLM(tiny_model_factory("llama"), skip_tokenizer_init=True, device="cpu", max_model_len=64,
              enable_chunked_prefill=False, max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="max_num_batched_tokens.*16.*at least 17"):
        llm.generate([GOOD, {"prompt_token_ids": list(range(3, 20))}], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    # a prompt of exactly the budget runs, and so does everything queued behind it
    outs = llm.generate([{"prompt_token_ids": list(range(3, 19))}, GOOD],
                        SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
    chunked = LLM(tiny_model_factory("llama"), skip_tokenizer_init=True, device="cpu", max_model_len=64,
                  max_num_batched_tokens=16)  # with chunked prefill the same prompt is fine
    out = chunked.generate([{"prompt_token_ids": list(range(3, 20))}], SamplingParams(max_tokens=4, ignore_eos=True),
                           use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4

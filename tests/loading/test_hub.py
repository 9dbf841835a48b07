"""Hub repo ids: looked up in the cache, downloaded with huggingface_hub when missing (a local
stand-in replaces the hub: tests never reach it), refused clearly when offline."""

from __future__ import annotations

import os
import shutil

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError

from nanovllm import LLM, SamplingParams
from nanovllm.loading.resolve import HUB_ALLOW_PATTERNS, resolve_model

REPO = "tiny-org/tiny-llama"


class FakeHub:
    """Stands in for `huggingface_hub.snapshot_download`: serves one repo from a local directory."""

    def __init__(self, repo_dir: str, fail_with: Exception | None = None) -> None:
        self.repo_dir = repo_dir
        self.fail_with = fail_with
        self.downloads: list[dict] = []

    def __call__(self, repo_id, *, revision=None, cache_dir=None, local_files_only=False, allow_patterns=None,
                 **kwargs):
        snapshot = os.path.join(cache_dir, f"models--{repo_id.replace('/', '--')}", "snapshots", revision or "main")
        if local_files_only:
            if os.path.isdir(snapshot):
                return snapshot
            raise LocalEntryNotFoundError(f"{repo_id} is not cached")
        if self.fail_with is not None:
            raise self.fail_with
        if repo_id != REPO:
            raise LocalEntryNotFoundError(f"404: {repo_id}")
        self.downloads.append(dict(repo_id=repo_id, revision=revision, cache_dir=cache_dir,
                                   allow_patterns=allow_patterns))
        shutil.copytree(self.repo_dir, snapshot)
        return snapshot


@pytest.fixture()
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_missing_repo_is_downloaded_into_download_dir(tiny_model_factory, tmp_path, monkeypatch, online):
    hub = FakeHub(tiny_model_factory("llama"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    cache = tmp_path / "hf-cache"
    llm = LLM(REPO, download_dir=str(cache), revision="v1", skip_tokenizer_init=True, device="cpu", max_model_len=64)
    assert hub.downloads == [dict(repo_id=REPO, revision="v1", cache_dir=str(cache), allow_patterns=HUB_ALLOW_PATTERNS)]
    assert llm.engine.source.path.startswith(str(cache))
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    # a second engine finds it in the cache: no second download
    resolve_model(REPO, str(cache), "v1")
    assert len(hub.downloads) == 1


def test_offline_names_hf_download_and_the_cache_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(str(tmp_path)))
    cache = tmp_path / "elsewhere"
    with pytest.raises(ValueError) as e:
        resolve_model("some-org/missing-model", download_dir=str(cache))
    message = str(e.value)
    assert "hf download some-org/missing-model" in message and str(cache) in message
    assert "HF_HUB_OFFLINE" in message and "{model}" not in message


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch, online):
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        FakeHub(str(tmp_path), fail_with=OSError("connection refused")))
    with pytest.raises(ValueError, match=r"not found .*could not be downloaded.*connection refused.*hf download"):
        resolve_model("some-org/unreachable", download_dir=str(tmp_path / "c"))


def test_default_cache_is_hf_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(str(tmp_path)))
    with pytest.raises(ValueError, match=str(constants.HF_HUB_CACHE)):
        resolve_model("some-org/missing-model")


def test_generation_config_gives_default_sampling_params(tiny_model_factory, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model_factory("llama"), model)
    (model / "generation_config.json").write_text('{"temperature": 0.6, "top_p": 0.95, "top_k": 20, '
                                                  '"do_sample": true}')
    llm = LLM(str(model), skip_tokenizer_init=True, device="cpu", max_model_len=64)
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.95, 20)
    params.max_tokens = 5  # adjustable after construction, as in vLLM's examples
    assert len(llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0].token_ids) == 5
    plain = LLM(str(model), skip_tokenizer_init=True, device="cpu", max_model_len=64, generation_config="vllm")
    assert plain.get_default_sampling_params().temperature == 1.0


def test_generation_config_max_new_tokens_is_a_default(tiny_model_factory, tmp_path):
    """The model's max_new_tokens is not the caller's choice: clamped to the room left in the
    context, as the built-in default is, while an explicit max_tokens beyond it is refused."""
    model = tmp_path / "m"
    shutil.copytree(tiny_model_factory("llama"), model)
    (model / "generation_config.json").write_text('{"max_new_tokens": 500, "temperature": 0.0}')
    llm = LLM(str(model), skip_tokenizer_init=True, device="cpu", max_model_len=64)
    prompt = [[1, 2, 3] * 20]  # 60 tokens: room for 4
    for params in (None, llm.get_default_sampling_params(), llm.get_default_sampling_params().replace(seed=1)):
        out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) <= 4
    explicit = llm.get_default_sampling_params()
    explicit.max_tokens = 500
    with pytest.raises(ValueError, match="max_tokens=500 does not fit"):
        llm.generate(prompt, explicit, use_tqdm=False)

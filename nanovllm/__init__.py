"""nanovllm: a small, readable, fast LLM inference engine with vLLM's API."""

import logging as _logging
import sys as _sys

from nanovllm.engine.arg_utils import EngineArgs
from nanovllm.outputs import CompletionOutput, Logprob, RequestOutput
from nanovllm.sampling_params import GuidedDecodingParams, RequestOutputKind, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"


def _setup_logging() -> None:
    """Engine start-up facts (KV blocks, max concurrency) go to stderr at INFO, like vLLM."""
    logger = _logging.getLogger("nanovllm")
    if not logger.handlers:
        handler = _logging.StreamHandler(_sys.stderr)
        handler.setFormatter(_logging.Formatter("%(levelname)s %(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(_logging.INFO)
        logger.propagate = False


_setup_logging()
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "RequestOutputKind", "EngineArgs",
           "StructuredOutputsParams", "GuidedDecodingParams"]


def __getattr__(name):
    # LLM pulls in torch and transformers; import it on first use so `import nanovllm` stays light.
    if name == "LLM":
        from nanovllm.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'nanovllm' has no attribute {name!r}")

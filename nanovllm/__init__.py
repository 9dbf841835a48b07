"""nanovllm: a small, readable, fast LLM inference engine with vLLM's API."""

from nanovllm.outputs import CompletionOutput, Logprob, RequestOutput
from nanovllm.sampling_params import RequestOutputKind, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "RequestOutputKind"]


def __getattr__(name):
    # LLM pulls in torch and transformers; import it on first use so `import nanovllm` stays light.
    if name == "LLM":
        from nanovllm.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module 'nanovllm' has no attribute {name!r}")

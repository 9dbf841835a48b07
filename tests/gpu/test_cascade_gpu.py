"""GPU engine with cascade attention and mixed-step CUDA graphs: no token changes (fp32).

- cascade forced vs off, CUDA graphs on: prefix-cache hits (one and two shared prefixes, one
  ending mid-block) and n > 1 forks replay the "cascade" graphs;
- the chunked-prefill cap with its "mixed" graphs (decodes + a prompt chunk, the chunk's
  cached context split off by the shared-prefix kernel) vs an eager engine without either.
"""

import pytest
import torch

from nanovllm import LLM, SamplingParams

pytestmark = pytest.mark.gpu
KW = dict(skip_tokenizer_init=True, device="cuda", dtype="float32", max_model_len=256, num_kv_blocks=512,
          max_num_seqs=16)


def ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (n,), generator=g).tolist()


def shared_prefix_run(llm, prefixes, n_tails=6, n=1, max_tokens=24):
    for p in prefixes:  # cached first, so the batch shares its blocks
        llm.generate([{"prompt_token_ids": p}], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    prompts = [{"prompt_token_ids": prefixes[i % len(prefixes)] + ids(3 + 5 * i, 40 + i)} for i in range(n_tails)]
    params = SamplingParams(temperature=0 if n == 1 else 0.8, seed=3, max_tokens=max_tokens, ignore_eos=True, n=n)
    return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_cascade_graphs_change_no_token(tiny_model_factory):
    path = tiny_model_factory("qwen3")
    on = LLM(path, cascade_attention="force", **KW)
    off = LLM(path, cascade_attention="off", **KW)
    graphs = on.engine.executor.worker.runner.cuda_graphs
    for prefixes in ([ids(48, 1)], [ids(40, 2), ids(72, 3)]):
        assert shared_prefix_run(on, prefixes) == shared_prefix_run(off, prefixes)
    assert shared_prefix_run(on, [ids(33, 4)], n_tails=2, n=3) == shared_prefix_run(off, [ids(33, 4)], n_tails=2, n=3)
    assert graphs.num_replays["cascade"] > 0
    assert off.engine.executor.worker.runner.cuda_graphs.num_replays["cascade"] == 0


def test_mixed_graphs_with_chunk_contexts_change_no_token(tiny_model_factory):
    """Short decodes running while two long prompts arrive, chunked 16 tokens at a time."""
    path = tiny_model_factory("llama")
    capped = LLM(path, cascade_attention="force", max_prefill_tokens_while_decoding=16, **KW)
    eager = LLM(path, cascade_attention="off", enforce_eager=True, **KW)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    def run(llm):
        engine = llm.engine
        for i in range(6):
            engine.add_request(f"d{i}", {"prompt_token_ids": ids(5 + i, 60 + i)}, params)
        outs, steps = {}, 0
        while engine.has_unfinished_requests():
            steps += 1
            if steps == 4:  # the decodes are running now
                engine.add_request("long0", {"prompt_token_ids": ids(150, 70)}, params)
                engine.add_request("long1", {"prompt_token_ids": ids(120, 71)}, params)
            for out in engine.step():
                if out.finished:
                    outs[out.request_id] = out.outputs[0].token_ids
        return outs

    assert run(capped) == run(eager)
    replays = capped.engine.executor.worker.runner.cuda_graphs.num_replays
    assert replays["mixed"] > 0
    assert capped.engine.executor.worker.runner.num_cascade_steps > 0  # chunk contexts were split off

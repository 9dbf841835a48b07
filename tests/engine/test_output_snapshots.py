"""Each RequestOutput carries a snapshot of the request's metrics: later steps do not change the
metrics of outputs already returned."""

from nanovllm import LLM, SamplingParams
from nanovllm.outputs import RequestMetrics
from nanovllm.sampling_params import RequestOutputKind


def test_streamed_outputs_keep_their_own_metrics(tiny_model_factory):
    llm = LLM(tiny_model_factory("llama"), skip_tokenizer_init=True, device="cpu", max_model_len=64)
    engine = llm.engine
    engine.add_request("r", {"prompt_token_ids": [5, 6, 7]},
                       SamplingParams(max_tokens=4, ignore_eos=True, output_kind=RequestOutputKind.DELTA))
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert len(outs) == 4 and [len(o.outputs[0].token_ids) for o in outs] == [1, 1, 1, 1]
    assert [o.outputs[0].finish_reason for o in outs] == [None, None, None, "length"]
    metrics = [o.metrics for o in outs]
    assert all(type(m) is RequestMetrics for m in metrics)
    assert len({id(m) for m in metrics}) == 4  # one object per output
    last = [m.last_token_time for m in metrics]
    assert last == sorted(last) and len(set(last)) == 4  # each froze the time of its own token
    assert [m.finished_time is not None for m in metrics] == [False, False, False, True]
    assert all(m.arrival_time == metrics[0].arrival_time and m.first_token_time == metrics[0].first_token_time
               for m in metrics)

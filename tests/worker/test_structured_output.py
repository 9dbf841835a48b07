"""Grammar modules: compile + cache, matchers fed with tokens, bitmask fill (the engine's
engine/structured_output.py), bitmask apply (the worker's worker/grammar_mask.py).

Decoding is simulated without a model: random logits per step, masked by the grammar, then
argmax. Whatever the logits say, the output must follow the constraint.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from nanovllm.sampling_params import StructuredOutputsParams  # noqa: E402
from nanovllm.engine.structured_output import (  # noqa: E402
    BATCH_FILL_MIN_ROWS,
    StructuredOutputManager,
    bitmask_width,
)
from nanovllm.worker.grammar_mask import apply_token_bitmask_, apply_token_bitmask_reference  # noqa: E402

MAX_STEPS = 96

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def tokenizer():
    from nanovllm.loading.model_info import load_tokenizer
    from nanovllm.loading.resolve import resolve_model

    return load_tokenizer(resolve_model(None))


@pytest.fixture()
def manager(tokenizer):
    return StructuredOutputManager(tokenizer, vocab_size=len(tokenizer), stop_token_ids=[tokenizer.eos_token_id])


def decode_constrained(manager, spec, seed: int, request_id: str = "r") -> tuple[str, list[int]]:
    """Greedy decoding of random logits under the grammar; returns (text, tokens incl. EOS)."""
    gen = torch.Generator().manual_seed(seed)
    eos = manager.stop_token_ids[0]
    tokens: list[int] = []
    for _ in range(MAX_STEPS):
        filled = manager.fill_bitmask([request_id], [spec], [tokens])
        assert filled is not None, "a live grammar must give a bitmask row"
        bitmask, rows = filled
        assert rows == [0]
        logits = torch.randn(1, manager.vocab_size, generator=gen)
        apply_token_bitmask_reference(logits, torch.from_numpy(bitmask), torch.tensor(rows))
        token = int(logits.argmax())
        tokens.append(token)
        if token == eos:
            break
    else:
        pytest.fail(f"grammar did not finish in {MAX_STEPS} steps")
    manager.release([request_id])
    return manager.tokenizer.decode(tokens[:-1]), tokens


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_validates(manager, seed):
    spec = StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)
    text, _ = decode_constrained(manager, spec, seed)
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("seed", [0, 1])
def test_choice_regex_and_grammar(manager, seed):
    text, _ = decode_constrained(manager, StructuredOutputsParams(choice=["positive", "negative", "n/a \"x\""]), seed)
    assert text in ("positive", "negative", 'n/a "x"')
    regex = r"[a-z]{2,5}@[a-z]{3}\.com"
    text, _ = decode_constrained(manager, StructuredOutputsParams(regex=regex), seed)
    assert re.fullmatch(regex, text), text
    ebnf = 'root ::= "SELECT " col " FROM t"\ncol ::= "a" | "b"'
    text, _ = decode_constrained(manager, StructuredOutputsParams(grammar=ebnf), seed)
    assert text in ("SELECT a FROM t", "SELECT b FROM t")



def allowed_tokens(bitmask: np.ndarray, row: int, vocab_size: int) -> set[int]:
    return {t for t in range(vocab_size) if bitmask[row, t // 32] >> (t % 32) & 1}


def test_json_object_allows_objects_only(manager):
    spec = StructuredOutputsParams(json_object=True)
    tok = manager.tokenizer
    bitmask, _ = manager.fill_bitmask(["o"], [spec], [[]])
    first = {tok.decode([t]) for t in allowed_tokens(bitmask, 0, manager.vocab_size)}
    assert first and all(t.strip() == "" or t.lstrip().startswith("{") for t in first), sorted(first)[:20]
    obj = tok('{"a": [1, 2]}').input_ids
    bitmask, _ = manager.fill_bitmask(["o"], [spec], [obj])
    assert manager.stop_token_ids[0] in allowed_tokens(bitmask, 0, manager.vocab_size)  # complete: EOS allowed


def test_compilation_is_cached_per_schema(manager):
    a = StructuredOutputsParams(json={"type": "object", "properties": {"x": {"type": "integer"}}})
    same = StructuredOutputsParams(json='{"properties": {"x": {"type": "integer"}}, "type": "object"}')
    other = StructuredOutputsParams(json={"type": "object", "properties": {"y": {"type": "integer"}}})
    manager.validate(a)
    manager.validate(same)
    assert manager.compiler.num_compilations == 1
    manager.validate(other)
    manager.validate(StructuredOutputsParams(json=a.json, disable_any_whitespace=True))  # another grammar
    assert manager.compiler.num_compilations == 3
    # requests reuse the compiled grammar
    manager.fill_bitmask(["r1", "r2"], [a, same], [[], []])
    assert manager.compiler.num_compilations == 3 and manager.num_live_matchers == 2
    manager.release(["r1", "r2", "unknown"])
    assert manager.num_live_matchers == 0


@pytest.mark.parametrize("spec, words", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "json"),
    (dict(regex="[a-"), "regex"),
    (dict(grammar="root ::= undefined_rule"), "grammar"),
])
def test_bad_specs_are_value_errors(manager, spec, words):
    with pytest.raises(ValueError, match=words):
        manager.validate(StructuredOutputsParams(**spec))


def test_bitmask_rows_only_for_structured_requests(manager):
    spec = StructuredOutputsParams(choice=["yes", "no"])
    assert manager.fill_bitmask(["a", "b"], [None, None], [[], []]) is None
    bitmask, rows = manager.fill_bitmask(["a", "s", "b"], [None, spec, None], [[], [], []])
    assert rows == [1]  # one bitmask row, for the one grammar row of the batch
    assert bitmask.shape == (1, bitmask_width(manager.vocab_size)) and bitmask.dtype == np.int32
    texts = {manager.tokenizer.decode([t]) for t in allowed_tokens(bitmask, 0, manager.vocab_size)}
    assert texts and all("yes".startswith(x) or "no".startswith(x) for x in texts), texts


def test_many_rows_are_filled_like_one_by_one(manager):
    """From BATCH_FILL_MIN_ROWS rows xgrammar fills on threads: same bits as row by row."""
    specs = [StructuredOutputsParams(json=PERSON), None, StructuredOutputsParams(choice=["yes", "no"])]
    specs = (specs * BATCH_FILL_MIN_ROWS)[: BATCH_FILL_MIN_ROWS + 3]
    prefix = manager.tokenizer('{"name": "Al').input_ids
    outputs = [prefix if s is not None and s.json else [] for s in specs]
    ids = [f"m{i}" for i in range(len(specs))]
    bitmask, rows = manager.fill_bitmask(ids, specs, outputs)
    assert rows == [i for i, s in enumerate(specs) if s is not None]
    for k, i in enumerate(rows):
        single = StructuredOutputManager(manager.tokenizer, manager.vocab_size, manager.stop_token_ids)
        single._compiler = manager.compiler
        alone, _ = single.fill_bitmask(["x"], [specs[i]], [outputs[i]])
        assert np.array_equal(bitmask[k], alone[0])


def test_finished_grammar_stops_masking(manager):
    spec = StructuredOutputsParams(choice=["yes"])
    _, tokens = decode_constrained(manager, spec, seed=0, request_id="done")
    assert manager.fill_bitmask(["done"], [spec], [tokens]) is None  # terminated after EOS


def test_refused_token_stops_constraining(manager, caplog):
    spec = StructuredOutputsParams(choice=["yes"])
    bad = manager.tokenizer("no").input_ids
    assert manager.fill_bitmask(["x"], [spec], [bad]) is None
    assert "does not fit its grammar" in caplog.text


# ----------------------------------------------------------------------------- apply


@pytest.mark.parametrize("vocab_size", [31, 32, 100, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [[0, 3], [1], [0, 1, 2, 3, 4]])
def test_apply_reference_matches_xgrammar(vocab_size, dtype, rows):
    gen = torch.Generator().manual_seed(vocab_size)
    batch = 5
    logits = torch.randn(batch, vocab_size, generator=gen).to(dtype)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (len(rows), bitmask_width(vocab_size)), generator=gen,
                            dtype=torch.int64).to(torch.int32)  # [R, W]: one row per grammar row
    rows_t = torch.tensor(rows, dtype=torch.int64)
    ours = logits.clone()
    apply_token_bitmask_reference(ours, bitmask, rows_t)
    theirs = logits.clone()
    apply_token_bitmask_(theirs, bitmask, rows_t, use_kernel=True)  # xgrammar's CPU kernel
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # untouched rows stay as they were; masked entries are exactly the zero bits
    for r in range(batch):
        if r not in rows:
            assert torch.equal(ours[r], logits[r])
            continue
        k = rows.index(r)
        for t in range(vocab_size):
            bit = (int(bitmask[k, t // 32]) >> (t % 32)) & 1
            assert (ours[r, t] == float("-inf")) == (bit == 0)
            if bit:
                assert ours[r, t] == logits[r, t]


@pytest.mark.gpu
@pytest.mark.parametrize("vocab_size", [32000, 151936])
@pytest.mark.parametrize("rows", [[1, 2, 6], list(range(8))])
def test_apply_kernel_matches_reference_gpu(vocab_size, rows):
    gen = torch.Generator().manual_seed(0)
    batch = 8
    logits = torch.randn(batch, vocab_size, generator=gen).to(torch.bfloat16).cuda()
    bitmask = torch.randint(-(2**31), 2**31 - 1, (len(rows), bitmask_width(vocab_size)), generator=gen,
                            dtype=torch.int64).to(torch.int32).cuda()
    rows_t = torch.tensor(rows, device="cuda")
    ours = logits.clone()
    apply_token_bitmask_reference(ours, bitmask, rows_t)
    theirs = logits.clone()
    apply_token_bitmask_(theirs, bitmask, rows_t)  # Triton kernel on CUDA
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

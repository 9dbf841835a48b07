"""Schema-driven fuzzing of the HTTP API (schemathesis, from the server's own OpenAPI document).

Runs against the shared bundled-model server (tests/serve/conftest.py): a bounded,
derandomized set of examples per operation, valid and invalid (schemathesis' positive and
negative modes). Every response must be below 500, every 4xx must carry the OpenAI error
shape, and afterwards the server must be healthy with nothing running and no KV block held.
Generation is capped at GENERATION_CAP tokens (a max_tokens that would fit is lowered, chat
gets one when it has none) so the budget goes to the API surface, not to decoding on CPU;
values beyond the context still reach the server unchanged.
"""

from __future__ import annotations

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

EXAMPLES_PER_OPERATION = {"positive": 16, "negative": 24}
GENERATION_CAP = 8
REQUEST_TIMEOUT_S = 60
GENERATING = ("/v1/completions", "/v1/chat/completions")
MUST_FUZZ = {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize"}


@pytest.fixture(scope="module")
def operations(server):
    document = httpx.get(server.url + "/openapi.json", headers=server.headers, timeout=30).json()
    ops = [result.ok() for result in schemathesis.openapi.from_dict(document).get_all_operations()]
    assert MUST_FUZZ <= {op.label for op in ops}
    return ops


def cap_generation(case, max_model_len: int) -> None:
    if case.path not in GENERATING or not isinstance(case.body, dict):
        return
    body = case.body
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and GENERATION_CAP < value < max_model_len:
            body[key] = GENERATION_CAP
    if case.path == "/v1/chat/completions" and body.get("max_tokens") is None \
            and body.get("max_completion_tokens") is None:
        body["max_tokens"] = GENERATION_CAP


def check_response(case, response) -> None:
    where = f"{case.method} {case.formatted_path} body={str(case.body)[:300]!r}"
    assert response.status_code < 500, f"{where} -> {response.status_code} {response.text[:500]}"
    if 400 <= response.status_code < 500:
        try:
            err = response.json().get("error")
        except ValueError:
            err = None
        assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, \
            f"{where} -> not the OpenAI error shape: {response.status_code} {response.text[:300]}"
        assert err["code"] == response.status_code and isinstance(err["message"], str) and err["message"], where


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzzed_requests_get_no_5xx_and_openai_errors(operations, server, mode):
    generation_mode = schemathesis.GenerationMode(mode)
    fuzzed = []
    for op in operations:

        @given(case=op.as_strategy(generation_mode=generation_mode))
        @settings(max_examples=EXAMPLES_PER_OPERATION[mode], deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            cap_generation(case, server.max_model_len)
            response = case.call(base_url=server.url, headers=server.headers, timeout=REQUEST_TIMEOUT_S)
            check_response(case, response)

        try:
            fuzz()
        except Unsatisfiable:
            assert mode == "negative", op.label  # nothing to make invalid (e.g. GET /health)
            continue
        fuzzed.append(op.label)
    assert MUST_FUZZ <= set(fuzzed)


def test_server_is_healthy_after_fuzzing(server):
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    m = server.wait_idle()
    assert m["nanovllm:num_requests_running"] == 0 and m["nanovllm:num_requests_waiting"] == 0
    assert m["nanovllm:kv_cache_usage_perc"] == 0
    r = httpx.post(server.url + "/v1/completions", headers=server.headers,
                   json={"prompt": "Hello", "max_tokens": 3, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1

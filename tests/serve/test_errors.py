"""Bad input through real HTTP, auth, and 64 concurrent requests of which some go away early."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest


def _post(server, path, content=None, json_body=None, headers=None):
    h = dict(server.headers if headers is None else headers)
    h.setdefault("Content-Type", "application/json")
    return httpx.post(server.url + path, content=content if content is not None else json.dumps(json_body),
                      headers=h, timeout=60)


def _assert_error(r, status, param=None, contains=()):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["message"]
    if param is not None:
        assert err["param"] == param, err
    for text in contains:
        assert text in err["message"], err


@pytest.mark.parametrize("path, body, status, param, contains", [
    ("/v1/completions", '{"prompt": "hi",', 400, None, ("malformed JSON",)),
    ("/v1/completions", "[1, 2]", 400, None, ("JSON object",)),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt", ("required",)),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", ("integer",)),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", ()),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt", ()),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", ()),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", ("temperature",)),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", ()),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", ()),
    ("/v1/completions", {"prompt": "hi", "logprobs": 99}, 400, "logprobs", ()),
    ("/v1/completions", {"prompt": "hi", "frobnicate": True}, 400, "frobnicate", ("frobnicate",)),
    ("/v1/completions", {"prompt": []}, 400, "prompt", ()),
    ("/v1/completions", {"prompt": [10 ** 9]}, 400, "prompt", ("vocabulary",)),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2000}, 400, "max_tokens", ("1024", "2000")),
    ("/v1/completions", {"prompt": "hello " * 1100}, 400, "prompt", ("1024",)),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", ()),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages", ()),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 1100},
     400, "max_completion_tokens", ("1024", "1100")),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs", ()),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": []}, 400, "tools", ()),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", ("gpt-4",)),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "nope"}, 404, "model", ()),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", ()),
    ("/tokenize", {}, 400, None, ()),
])
def test_bad_requests(server, path, body, status, param, contains):
    content = body if isinstance(body, str) else None
    r = _post(server, path, content=content, json_body=None if content else body)
    _assert_error(r, status, param, contains)


def test_unknown_model_with_openai_client(client):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="not-this-one", prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=client.models.list().data[0].id, prompt="hi", temperature=-1)


def test_api_key(server):
    body = {"prompt": "hi", "max_tokens": 1}
    _assert_error(_post(server, "/v1/completions", json_body=body, headers={}), 401)
    _assert_error(_post(server, "/v1/completions", json_body=body, headers={"Authorization": "Bearer wrong"}), 401)
    _assert_error(_post(server, "/v1/completions", json_body=body, headers={"Authorization": server.api_key}), 401)
    _assert_error(httpx.get(server.v1 + "/models", timeout=30), 401)
    # auth comes before parsing: a malformed body without a key is still a 401
    _assert_error(_post(server, "/v1/completions", content="{", headers={}), 401)
    _assert_error(_post(server, "/tokenize", json_body={"prompt": "x"}, headers={}), 401)
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # open
    assert httpx.get(server.url + "/metrics", timeout=30).status_code == 200  # open
    assert _post(server, "/v1/completions", json_body=body).status_code == 200


def test_body_too_large(server):
    big = json.dumps({"prompt": "a" * (11 * 1024 * 1024)})
    _assert_error(_post(server, "/v1/completions", content=big), 413, contains=("limit",))
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200


def test_unknown_route(server):
    _assert_error(httpx.get(server.url + "/v1/nothing", headers=server.headers, timeout=30), 404)


async def _mixed_load(server, n_total=64):
    """Good, bad and disconnecting requests at once. Returns (answered good, right-status bad, gone)."""
    model = server.model
    good, refused, gone = [], [], []
    limits = httpx.Limits(max_connections=n_total, max_keepalive_connections=n_total)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=300, limits=limits) as http:

        async def good_plain(i):
            r = await http.post("/v1/completions", json={"model": model, "prompt": f"Count: {i},", "max_tokens": 6,
                                                        "temperature": 0, "ignore_eos": True})
            ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
            good.append(ok)

        async def good_stream(i):
            body = {"model": model, "messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": 6,
                    "stream": True, "temperature": 0}
            async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            good.append(r.status_code == 200 and lines[-1] == "data: [DONE]")

        async def bad_request(i):
            kind = i % 3
            if kind == 0:
                r = await http.post("/v1/completions", content=b"{nope", headers={"Content-Type": "application/json"})
                refused.append(r.status_code == 400)
            elif kind == 1:
                r = await http.post("/v1/completions", json={"model": model, "prompt": "x", "temperature": -1})
                refused.append(r.status_code == 400)
            else:
                r = await http.post("/v1/completions", json={"model": "other", "prompt": "x"})
                refused.append(r.status_code == 404)

        async def leave_stream(i):  # read the first token, then hang up
            body = {"model": model, "prompt": f"Story {i}:", "max_tokens": 400, "ignore_eos": True, "stream": True}
            async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=300) as own:
                async with own.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            break
            gone.append(True)

        async def leave_plain(i):  # a non-streamed request whose client gives up
            body = {"model": model, "prompt": f"Essay {i}:", "max_tokens": 400, "ignore_eos": True}
            async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=300) as own:
                try:
                    await asyncio.wait_for(own.post("/v1/completions", json=body), timeout=3.0)
                except asyncio.TimeoutError:
                    pass
            gone.append(True)

        kinds = [good_plain, good_stream, good_plain, bad_request, leave_stream, good_stream, leave_plain, bad_request]
        await asyncio.gather(*(kinds[i % len(kinds)](i) for i in range(n_total)))
    return good, refused, gone


def test_concurrent_requests_with_disconnects(server):
    before = server.metrics()
    good, refused, gone = asyncio.run(_mixed_load(server))
    assert len(good) == 32 and all(good)
    assert len(refused) == 16 and all(refused)
    assert len(gone) == 16
    # every abandoned request was aborted: nothing runs, nothing waits, every KV block is free
    after = server.wait_idle(timeout=60)
    assert after["nanovllm:num_requests_running"] == 0
    assert after["nanovllm:num_requests_waiting"] == 0
    assert after["nanovllm:kv_cache_usage_perc"] == 0
    # the 16 abandoned requests (400 tokens each) were cut short
    generated = after["nanovllm:generation_tokens_total"] - before["nanovllm:generation_tokens_total"]
    assert generated < 32 * 6 + 16 * 400 / 2
    # (the counter appears with the first finished request: absent before = 0)
    assert after["nanovllm:request_success_total"] - before.get("nanovllm:request_success_total", 0.0) == 32
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200

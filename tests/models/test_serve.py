"""`alignkit serve`: a real server in a thread on 127.0.0.1 (port 0) serving the tiny model,
spoken to by alignkit's own client (Endpoint) and by raw HTTP: completions and log-probs,
seeds, the API key, size and field limits, errors as JSON, the timeout and retry paths."""

from __future__ import annotations

import http.client
import json
import os
import time

import pytest
import torch

from alignkit.cli.main import main
from alignkit.engine.device import Runtime
from alignkit.errors import AlignkitError
from alignkit.models.endpoint import Endpoint, EndpointError
from alignkit.models.serve import ServeLimits, make_server
from alignkit.models.tiny import tiny_model, tiny_tokenizer

CPU = Runtime(torch.device("cpu"), None)
KEY_VAR = "ALIGNKIT_TEST_SERVE_KEY"
SECRET = "sk-serve-test-0123456789"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0).eval(), tiny_tokenizer()


@pytest.fixture
def server(tiny):
    logs: list[str] = []
    with make_server(*tiny, port=0, model_name="tiny", runtime=CPU,
                     limits=ServeLimits(max_tokens=64, max_body_bytes=4000),
                     log=logs.append) as srv:
        srv.logs = logs
        yield srv


def _raw(server, method: str, path: str, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def _post(server, payload, headers: dict | None = None) -> tuple[int, dict]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return _raw(server, "POST", "/v1/chat/completions", data,
                {"Content-Type": "application/json", **(headers or {})})


def test_binds_loopback_by_default(tiny):
    srv = make_server(*tiny, port=0, runtime=CPU)
    try:
        assert srv.server_address[0] == "127.0.0.1"
        assert srv.url.startswith("http://127.0.0.1:")
    finally:
        srv.server_close()


def test_chat_completion_through_alignkits_client(server, tiny):
    from alignkit.data.templates import encode_prompt
    from alignkit.models.generate import generate
    reply = Endpoint(server.url, "tiny", retries=0).chat(HELLO, max_tokens=5)
    model, tok = tiny
    ids = encode_prompt(tok, HELLO, "chat")
    expected = generate(model, tok, [ids], max_new_tokens=5)[0]
    assert reply["text"] == expected.text
    assert reply["finish_reason"] == ("stop" if expected.finished else "length")
    status, body = _post(server, {"model": "tiny", "messages": HELLO, "max_tokens": 5})
    assert status == 200 and body["object"] == "chat.completion"
    assert body["usage"] == {"prompt_tokens": len(ids),
                             "completion_tokens": len(expected.completion_ids),
                             "total_tokens": len(ids) + len(expected.completion_ids)}
    assert body["choices"][0]["logprobs"] is None


def test_logprobs_and_top_logprobs_match_a_direct_forward(server, tiny):
    model, tok = tiny
    status, body = _post(server, {"messages": HELLO, "max_tokens": 4, "temperature": 1.0,
                                  "seed": 11, "logprobs": True, "top_logprobs": 3})
    assert status == 200
    content = body["choices"][0]["logprobs"]["content"]
    from alignkit.data.templates import encode_prompt
    from alignkit.models.generate import generate
    ids = encode_prompt(tok, HELLO, "chat")
    gen = generate(model, tok, [ids], max_new_tokens=4, temperature=1.0, seed=11,
                   return_logps=True)[0]
    shown = gen.completion_ids[:-1] if gen.finished else gen.completion_ids
    assert len(content) == len(shown)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + shown])).logits[0].float()
    logps = logits.log_softmax(-1)[len(ids) - 1:len(ids) - 1 + len(shown)]  # (N, V)
    for n, entry in enumerate(content):
        assert entry["token"] == tok.decode([shown[n]])
        assert entry["logprob"] == pytest.approx(gen.logps[n], abs=1e-4)
        assert entry["logprob"] == pytest.approx(float(logps[n, shown[n]]), abs=1e-4)
        top = logps[n].topk(3)
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(
            top.values.tolist(), abs=1e-4)
        assert [t["token"] for t in entry["top_logprobs"]] == [tok.decode([i]) for i in
                                                                top.indices.tolist()]
    # the client reads them as {token: logprob} per position
    reply = Endpoint(server.url, "tiny", retries=0).chat(HELLO, max_tokens=3, logprobs=2)
    assert len(reply["top_logprobs"]) == 3 and all(len(p) <= 2 for p in reply["top_logprobs"])


def test_a_seed_makes_sampling_reproducible(server):
    ep = Endpoint(server.url, "tiny", retries=0)
    a = ep.chat(HELLO, max_tokens=8, temperature=1.0, seed=3)["text"]
    assert ep.chat(HELLO, max_tokens=8, temperature=1.0, seed=3)["text"] == a
    assert any(ep.chat(HELLO, max_tokens=8, temperature=1.0, seed=s)["text"] != a
               for s in (4, 5, 6))


def test_stop_strings_cut_the_text_and_its_logprobs(server, tiny):
    from alignkit.data.templates import encode_prompt
    from alignkit.models.generate import generate
    model, tok = tiny
    gen = generate(model, tok, [encode_prompt(tok, HELLO, "chat")], max_new_tokens=8,
                   temperature=1.0, seed=3)[0]
    cut = len(gen.text) // 2
    stop = gen.text[cut:cut + 2]
    cut = gen.text.find(stop)
    status, body = _post(server, {"messages": HELLO, "max_tokens": 8, "temperature": 1.0,
                                  "seed": 3, "stop": stop, "logprobs": True})
    choice = body["choices"][0]
    assert status == 200 and choice["message"]["content"] == gen.text[:cut]
    assert choice["finish_reason"] == "stop"
    kept = len(choice["logprobs"]["content"])  # the tokens whose text lies before the cut
    assert len(tok.decode(gen.completion_ids[:kept])) <= cut
    assert len(tok.decode(gen.completion_ids[:kept + 1])) > cut


def test_models_route_and_unknown_routes(server):
    status, body = _raw(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"]
    assert _raw(server, "GET", "/v1/nothing")[0] == 404
    status, body = _post(server, {"model": "gpt-x", "messages": HELLO})
    assert status == 404 and "gpt-x" in body["error"]["message"]
    assert _raw(server, "DELETE", "/v1/models")[0] == 404


@pytest.mark.parametrize("payload, words", [
    (b"{not json", "not valid JSON"),
    ([1, 2], "JSON object"),
    ({"messages": []}, "'messages'"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "role"),
    ({"messages": HELLO, "max_tokens": 65}, "'max_tokens': must be between 1 and 64"),
    ({"messages": HELLO, "max_tokens": "5"}, "'max_tokens': must be an integer"),
    ({"messages": HELLO, "temperature": "hot"}, "'temperature'"),
    ({"messages": HELLO, "top_p": 0}, "'top_p'"),
    ({"messages": HELLO, "top_logprobs": 2}, "needs logprobs: true"),
    ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "'top_logprobs'"),
    ({"messages": HELLO, "stream": True}, "streaming"),
    ({"messages": HELLO, "n": 2}, "'n'"),
])
def test_bad_requests_get_400_with_a_json_error(server, payload, words):
    status, body = _post(server, payload)
    assert status == 400 and words in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"


def test_oversized_body_gets_413(server):
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    status, body = _post(server, big)
    assert status == 413 and "limit is 4000" in body["error"]["message"]
    with pytest.raises(EndpointError) as e:  # the client reports it once, without retrying
        Endpoint(server.url, "tiny", retries=2, backoff=0.01).chat(big["messages"],
                                                                   max_tokens=2)
    assert e.value.status == 413


def test_api_key_401_without_and_200_with(tiny, monkeypatch):
    monkeypatch.setenv(KEY_VAR, SECRET)
    logs: list[str] = []
    with make_server(*tiny, port=0, model_name="tiny", runtime=CPU, api_key_env=KEY_VAR,
                     log=logs.append) as srv:
        status, body = _post(srv, {"messages": HELLO, "max_tokens": 2})
        assert status == 401 and body["error"]["type"] == "authentication_error"
        assert _post(srv, {"messages": HELLO, "max_tokens": 2},
                     {"Authorization": "Bearer wrong"})[0] == 401
        assert _raw(srv, "GET", "/v1/models")[0] == 401
        assert _post(srv, {"messages": HELLO, "max_tokens": 2},
                     {"Authorization": f"Bearer {SECRET}"})[0] == 200
        reply = Endpoint(srv.url, "tiny", api_key_env=KEY_VAR, retries=0).chat(HELLO,
                                                                              max_tokens=2)
        assert isinstance(reply["text"], str)
        with pytest.raises(EndpointError) as e:
            Endpoint(srv.url, "tiny", api_key_env="ALIGNKIT_TEST_NO_SUCH_VAR",
                     retries=0).chat(HELLO, max_tokens=2)
        assert e.value.status == 401
    assert len(logs) == 6 and not any(SECRET in line for line in logs)
    assert logs[0].endswith(" ms") and " POST /v1/chat/completions 401 " in logs[0]


def test_a_named_but_unset_key_variable_refuses_to_start(tiny, monkeypatch):
    monkeypatch.delenv(KEY_VAR, raising=False)
    with pytest.raises(AlignkitError, match=f"{KEY_VAR} is not set"):
        make_server(*tiny, port=0, runtime=CPU, api_key_env=KEY_VAR)


def test_timeout_path_a_client_gives_up_on_a_slow_server(tiny):
    def slow(n: int) -> None:
        time.sleep(1.0)

    with make_server(*tiny, port=0, model_name="tiny", runtime=CPU, hook=slow) as srv:
        start = time.monotonic()
        with pytest.raises(EndpointError, match="timed out") as e:
            Endpoint(srv.url, "tiny", timeout=0.2, retries=1, backoff=0.01).chat(
                HELLO, max_tokens=2)
        assert e.value.status is None and "2 attempts" in str(e.value)
        assert time.monotonic() - start < 0.9


def test_retry_path_a_503_is_retried_and_then_served(tiny):
    seen: list[int] = []

    def flaky(n: int) -> int | None:
        seen.append(n)
        return 503 if n == 0 else None

    with make_server(*tiny, port=0, model_name="tiny", runtime=CPU, hook=flaky) as srv:
        reply = Endpoint(srv.url, "tiny", retries=2, backoff=0.01).chat(HELLO, max_tokens=3)
    assert seen == [0, 1] and isinstance(reply["text"], str)


def test_cli_serve_refuses_an_endpoint_and_an_unset_key(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "http://127.0.0.1:9/v1#m"])
    assert e.value.code == 2 and "local model" in capsys.readouterr().err
    monkeypatch.delenv(KEY_VAR, raising=False)
    assert KEY_VAR not in os.environ
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "tiny", "--port", "0", "--api-key-env", KEY_VAR])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and f"{KEY_VAR} is not set" in err and "\n" not in err


def test_a_bug_is_a_json_500_and_the_server_keeps_serving(tiny):
    def broken(n: int) -> None:
        if n == 0:
            raise ValueError("boom")

    logs: list[str] = []
    with make_server(*tiny, port=0, model_name="tiny", runtime=CPU, hook=broken,
                     log=logs.append) as srv:
        status, body = _post(srv, {"messages": HELLO, "max_tokens": 2})
        assert status == 500 and body["error"]["message"] == "internal error (ValueError)"
        assert _post(srv, {"messages": HELLO, "max_tokens": 2})[0] == 200
    assert logs[0].endswith("(ValueError: boom)") and " 200 " in logs[1]


def test_a_prompt_longer_than_the_context_is_a_400(tiny):
    limits = ServeLimits(max_context=64)
    with make_server(*tiny, port=0, model_name="tiny", runtime=CPU, limits=limits) as srv:
        status, body = _post(srv, {"messages": HELLO, "max_tokens": 40})
    assert status == 400
    assert "exceeds the model's context of 64 tokens" in body["error"]["message"]

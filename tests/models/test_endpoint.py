"""The OpenAI-compatible client against a local stub server (http.server on 127.0.0.1, port 0),
and model spec parsing. No network beyond the loopback."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignkit.errors import AlignkitError, InputError
from alignkit.models.endpoint import Endpoint, EndpointError, parse_model_spec, redact_url

SECRET = "sk-test-secret-0123456789"


def completion(text: str, *, finish_reason: str = "stop", top_logprobs=None) -> dict:
    """A chat-completions response body; ``top_logprobs``: per position, {token: logprob}."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text},
              "finish_reason": finish_reason}
    if top_logprobs is not None:
        choice["logprobs"] = {"content": [
            {"token": max(pos, key=pos.get), "logprob": max(pos.values()),
             "top_logprobs": [{"token": t, "logprob": lp} for t, lp in pos.items()]}
            for pos in top_logprobs]}
    return {"id": "x", "object": "chat.completion", "choices": [choice]}


class StubServer:
    """A chat-completions server in a thread. ``reply(body, headers, n)`` returns
    ``(status, payload, delay_s)`` for the n-th request (0-based); payload is a dict (sent as
    JSON) or bytes. Every request is recorded as ``(path, headers, body)``."""

    def __init__(self, reply) -> None:
        self.reply, self.requests, self.lock = reply, [], threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                with stub.lock:
                    n = len(stub.requests)
                    stub.requests.append((self.path, dict(self.headers), body))
                status, payload, delay = stub.reply(body, self.headers, n)
                time.sleep(delay)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "StubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def echo(body, headers, n):
    """Answers with the last user message reversed (so order mix-ups show)."""
    return 200, completion(body["messages"][-1]["content"][::-1]), 0.0


def test_chat_posts_openai_request_and_parses_reply(monkeypatch):
    monkeypatch.setenv("TEST_KEY", SECRET)
    with StubServer(echo) as stub:
        ep = Endpoint(stub.url + "/", "m1", api_key_env="TEST_KEY")
        out = ep.chat([{"role": "user", "content": "abc"}], max_tokens=7, temperature=0.5,
                      top_p=0.9)
    assert out == {"text": "cba", "finish_reason": "stop", "top_logprobs": None}
    path, headers, body = stub.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {SECRET}"
    assert body == {"model": "m1", "messages": [{"role": "user", "content": "abc"}],
                    "max_tokens": 7, "temperature": 0.5, "top_p": 0.9}
    assert SECRET not in repr(ep) and SECRET not in json.dumps(vars(ep), default=str)


def test_no_key_variable_means_no_authorization_header(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with StubServer(echo) as stub:
        Endpoint(stub.url, "m", api_key_env="NO_SUCH_KEY_VAR").chat(
            [{"role": "user", "content": "x"}], max_tokens=1)
    assert "Authorization" not in stub.requests[0][1]


def test_logprobs_are_requested_and_parsed():
    positions = [{"A": -0.1, " B": -2.5}, {".": -0.01}]

    def reply(body, headers, n):
        return 200, completion("A.", top_logprobs=positions), 0.0

    with StubServer(reply) as stub:
        out = Endpoint(stub.url, "m").chat([{"role": "user", "content": "q"}], max_tokens=2,
                                           logprobs=5)
    assert stub.requests[0][2]["logprobs"] is True and stub.requests[0][2]["top_logprobs"] == 5
    assert out["top_logprobs"] == positions


def test_chat_many_keeps_input_order_and_bounds_concurrency():
    active, peak, lock = [0], [0], threading.Lock()

    def reply(body, headers, n):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05 * (3 - int(body["messages"][0]["content"]) % 3))  # finish out of order
        with lock:
            active[0] -= 1
        return 200, completion("r" + body["messages"][0]["content"]), 0.0

    with StubServer(reply) as stub:
        out = Endpoint(stub.url, "m", max_concurrency=2).chat_many(
            [[{"role": "user", "content": str(i)}] for i in range(6)], max_tokens=3)
    assert [o["text"] for o in out] == [f"r{i}" for i in range(6)]
    assert 1 <= peak[0] <= 2


@pytest.mark.parametrize("status", [500, 429, 503])
def test_retries_then_succeeds(status):
    def reply(body, headers, n):
        return (status, {"error": {"message": "busy"}}, 0.0) if n < 2 else \
            (200, completion("ok"), 0.0)

    with StubServer(reply) as stub:
        out = Endpoint(stub.url, "m", retries=3, backoff=0.01).chat(
            [{"role": "user", "content": "x"}], max_tokens=1)
    assert out["text"] == "ok" and len(stub.requests) == 3


def test_gives_up_after_retries_with_one_line_without_key(monkeypatch):
    monkeypatch.setenv("TEST_KEY", SECRET)

    def reply(body, headers, n):  # a server that echoes the key back in its error
        return 500, {"error": {"message": f"internal\nerror for key {SECRET}"}}, 0.0

    with StubServer(reply) as stub:
        ep = Endpoint(stub.url, "m", api_key_env="TEST_KEY", retries=2, backoff=0.01)
        with pytest.raises(EndpointError) as e:
            ep.chat([{"role": "user", "content": "x"}], max_tokens=1)
    message = str(e.value)
    assert len(stub.requests) == 3  # 1 + retries
    assert isinstance(e.value, AlignkitError) and e.value.status == 500
    assert "\n" not in message and SECRET not in message
    assert stub.url + "/chat/completions" in message and "500" in message
    assert "3 attempts" in message and "***" in message


def test_client_errors_and_malformed_replies_fail_at_once(monkeypatch):
    monkeypatch.setenv("TEST_KEY", SECRET)
    cases = [(401, {"error": {"message": f"Incorrect API key provided: {SECRET}"}}, "401"),
             (404, b"<html>not found</html>", "404"),
             (200, b"not json", "malformed"),
             (200, {"choices": []}, "malformed"),
             (200, {"choices": [{"message": {"content": 5}}]}, "malformed")]
    for status, payload, expected in cases:
        with StubServer(lambda body, headers, n: (status, payload, 0.0)) as stub:
            with pytest.raises(EndpointError) as e:
                Endpoint(stub.url, "m", api_key_env="TEST_KEY", retries=3, backoff=0.01).chat(
                    [{"role": "user", "content": "x"}], max_tokens=1)
        message = str(e.value)
        assert len(stub.requests) == 1, (status, payload)  # no retry
        assert expected in message and "\n" not in message and SECRET not in message
        assert "127.0.0.1" in message


def test_timeout_is_respected_and_retried():
    with StubServer(lambda body, headers, n: (200, completion("late"), 1.0)) as stub:
        ep = Endpoint(stub.url, "m", timeout=0.2, retries=1, backoff=0.01)
        start = time.monotonic()
        with pytest.raises(EndpointError) as e:
            ep.chat([{"role": "user", "content": "x"}], max_tokens=1)
        elapsed = time.monotonic() - start
    assert "timed out" in str(e.value) and "2 attempts" in str(e.value)
    assert len(stub.requests) == 2 and elapsed < 0.9  # 2 × 0.2 s + backoff, not 2 × 1 s


def test_connection_refused_is_retried_then_one_line():
    with StubServer(echo) as stub:
        url = stub.url
    ep = Endpoint(url, "m", retries=1, backoff=0.01, timeout=2)  # the server is gone
    with pytest.raises(EndpointError) as e:
        ep.chat([{"role": "user", "content": "x"}], max_tokens=1)
    assert "connection failed" in str(e.value) and "\n" not in str(e.value)


def test_redact_url_drops_credentials_and_query():
    assert redact_url("https://user:pw@host.example:8443/v1?api-key=k") == \
        "https://host.example:8443/v1"


# ------------------------------------------------------------------ model specs


def test_parse_model_spec_forms():
    assert parse_model_spec("tiny") == ("tiny", "tiny")
    assert parse_model_spec("embedded") == ("embedded", None)
    assert parse_model_spec("base=default") == ("base", None)
    assert parse_model_spec("runs/demo/sft/") == ("sft", "runs/demo/sft/")
    assert parse_model_spec("HuggingFaceTB/SmolLM2-135M") == ("SmolLM2-135M",
                                                               "HuggingFaceTB/SmolLM2-135M")
    assert parse_model_spec("aligned=runs/a=b/sft") == ("aligned", "runs/a=b/sft")
    assert parse_model_spec("runs/a=b") == ("a=b", "runs/a=b")  # '=' inside a path
    name, ep = parse_model_spec("http://127.0.0.1:8000/v1#llama3", api_key_env="K", timeout=5)
    assert name == "llama3" and isinstance(ep, Endpoint)
    assert (ep.base_url, ep.model, ep.api_key_env, ep.timeout) == \
        ("http://127.0.0.1:8000/v1", "llama3", "K", 5)
    name, ep = parse_model_spec("served=https://api.example.com/v1#gpt-x")
    assert name == "served" and ep.url == "https://api.example.com/v1/chat/completions"


@pytest.mark.parametrize("spec, why", [
    ("", "no model source"), ("name=", "no model source"), ("=tiny", "name before '='"),
    ("http://127.0.0.1:8000/v1", "after '#'"), ("http://127.0.0.1:8000/v1#", "after '#'"),
    ("http:///v1#m", "not a valid"), ("http://host:notaport/v1#m", "not a valid")])
def test_bad_model_specs_are_one_line_naming_the_field(spec, why):
    with pytest.raises(InputError) as e:
        parse_model_spec(spec)
    assert "field 'model'" in str(e.value) and why in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError) as e:
        parse_model_spec(spec, field="judge")
    assert "field 'judge'" in str(e.value)


def test_bad_spec_error_hides_url_credentials():
    with pytest.raises(InputError) as e:
        parse_model_spec(f"x=https://u:{SECRET}@host/v1")
    assert SECRET not in str(e.value) and "https://host/v1" in str(e.value)

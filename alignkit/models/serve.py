"""``alignkit serve``: an OpenAI-compatible chat-completions server for any alignkit model.

Standard library only (``http.server.ThreadingHTTPServer``); one model, one generation at a
time (a lock: the model is not shared between concurrent forwards). Routes::

    POST /v1/chat/completions   {"model", "messages", "max_tokens" | "max_completion_tokens",
                                 "temperature", "top_p", "seed", "stop", "logprobs",
                                 "top_logprobs", "n": 1, "stream": false}
    GET  /v1/models             the one model served

Prompts are rendered with alignkit's templates (:func:`alignkit.data.templates.encode_prompt`,
``auto``: the tokenizer's chat template, else ``[INST]``) and completed by
:func:`alignkit.models.generate.generate`. ``logprobs`` are the log-probabilities of the
emitted tokens under the model's raw next-token distribution (temperature 1, no top-p, as
``generate`` reports them); ``top_logprobs: k`` adds the k most likely tokens at each position,
from one forward over prompt + answer with the LM head applied only at the answer positions
(:func:`alignkit.models.logps.split_lm`). Without ``seed`` a request samples with a fresh
random seed; with it, the same request gives the same answer.

Safety: bound to 127.0.0.1 unless told otherwise; an optional API key (read once from the
environment variable named by ``api_key_env``, compared in constant time with
:func:`hmac.compare_digest`, never logged); request bodies over ``max_body_bytes`` get 413,
``max_tokens`` over the limit 400; every error is JSON ``{"error": {"message", "type",
"code"}}`` (400 bad JSON or fields, 401 key, 404 route or model, 408 body too slow, 413 too
large). The log has one line per request (client, method, path, status, time), never headers
or bodies.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import socket
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from alignkit.errors import AlignkitError, InputError

DEFAULT_HOST = "127.0.0.1"
ROLES = ("system", "user", "assistant")
Log = Callable[[str], None]
Hook = Callable[[int], "int | None"]  # request number (0-based) -> status to fail with, or None


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for. ``max_context`` (prompt + max_tokens) defaults to the
    model's ``max_position_embeddings``."""

    max_body_bytes: int = 1_000_000
    max_tokens: int = 2048
    default_max_tokens: int = 256
    max_top_logprobs: int = 20
    max_context: int | None = None
    read_timeout_s: float = 30.0


class RequestError(Exception):
    """An HTTP error answered as JSON."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


@dataclass
class ChatRequest:
    """A validated chat-completions request."""

    messages: list[dict]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    logprobs: bool = False
    top_logprobs: int = 0
    stop: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Request validation


def _bad(message: str, param: str | None = None) -> RequestError:
    return RequestError(400, f"'{param}': {message}" if param else message, code=param)


def _number(body: dict, key: str, default: float, low: float, high: float,
            *, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad("must be a number", key)
    if value > high or value < low or (low_open and value == low):
        raise _bad(f"must be in {'(' if low_open else '['}{low:g}, {high:g}]", key)
    return float(value)


def _integer(body: dict, key: str, default: int, low: int, high: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad("must be an integer", key)
    if not low <= value <= high:
        raise _bad(f"must be between {low} and {high}", key)
    return value


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text"}`` parts."""
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            raise _bad("only text parts are supported", f"messages[{i}].content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str) or not content.strip():
        raise _bad("must be a non-empty string", f"messages[{i}].content")
    return content


def _messages(body: dict) -> list[dict]:
    from alignkit.data.formats import check_turns
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad(f"needs a role: one of {', '.join(ROLES)}", f"messages[{i}].role")
        out.append({"role": m["role"], "content": _content(m, i)})
    try:
        check_turns(out, final_role="user")
    except InputError as e:
        raise _bad(str(e)) from None
    return out


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4 or not all(
            isinstance(s, str) and s for s in stop):
        raise _bad("must be a string or a list of at most 4 non-empty strings", "stop")
    return stop


def parse_request(body: object, limits: ServeLimits, model_name: str) -> ChatRequest:
    """Validate a chat-completions body (400 naming the field; 404 for another model)."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(404, f"model '{model}' is not served here; this server serves "
                                f"'{model_name}'", code="model_not_found")
    if body.get("stream"):
        raise _bad("streaming is not supported; send stream: false", "stream")
    _integer(body, "n", 1, 1, 1)
    key = "max_completion_tokens" if body.get("max_tokens") is None else "max_tokens"
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool) and logprobs is not None:
        raise _bad("must be true or false", "logprobs")
    top = _integer(body, "top_logprobs", 0, 0, limits.max_top_logprobs)
    if top and not logprobs:
        raise _bad("needs logprobs: true", "top_logprobs")
    seed = _integer(body, "seed", secrets.randbits(31), -(2 ** 63), 2 ** 63 - 1)
    return ChatRequest(
        messages=_messages(body),
        max_tokens=_integer(body, key, min(limits.default_max_tokens, limits.max_tokens), 1,
                            limits.max_tokens),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=seed % (2 ** 63), logprobs=bool(logprobs), top_logprobs=top, stop=_stop(body))


# ---------------------------------------------------------------------------------------------
# Generation


class Engine:
    """The model (put in eval mode: a served model never trains), its tokenizer and
    template, and the lock that serialises generation."""

    def __init__(self, model, tokenizer, name: str, *, template: str = "auto",
                 runtime=None, limits: ServeLimits = ServeLimits()) -> None:
        from alignkit.data.templates import resolve_template
        from alignkit.engine.device import resolve_runtime
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.template = resolve_template(template, tokenizer)
        self.runtime = runtime if runtime is not None else resolve_runtime("auto", "auto")
        config = getattr(model, "config", None)
        self.max_context = limits.max_context or getattr(config, "max_position_embeddings", None)
        self.lock = threading.Lock()

    def complete(self, req: ChatRequest) -> dict:
        """A chat.completion object for ``req`` (400 when the prompt does not fit)."""
        from alignkit.data.templates import encode_prompt
        from alignkit.models.generate import generate
        prompt = encode_prompt(self.tokenizer, req.messages, self.template)
        if self.max_context and len(prompt) + req.max_tokens > self.max_context:
            raise _bad(f"the prompt ({len(prompt)} tokens) plus max_tokens ({req.max_tokens}) "
                       f"exceeds the model's context of {self.max_context} tokens")
        with self.lock:
            out = generate(self.model, self.tokenizer, [prompt], max_new_tokens=req.max_tokens,
                           temperature=req.temperature, top_p=req.top_p, batch_size=1,
                           seed=req.seed, return_logps=req.logprobs,
                           autocast_dtype=self.runtime.autocast_dtype)[0]
            shown = out.completion_ids[:-1] if out.finished else out.completion_ids
            tops = (self.top_logprobs(prompt, shown, req.top_logprobs)
                    if req.logprobs and req.top_logprobs else None)
        text, kept = self._apply_stop(out.text, shown, req.stop)
        finished = out.finished or kept is not None  # a stop token or a stop string
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": "stop" if finished else "length", "logprobs": None}
        if req.logprobs:
            n = len(shown) if kept is None else kept
            choice["logprobs"] = {"content": self._logprob_content(
                shown[:n], (out.logps or [])[:n], tops[:n] if tops else None)}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": int(time.time()), "model": self.name, "choices": [choice],
                "usage": {"prompt_tokens": len(prompt),
                          "completion_tokens": len(out.completion_ids),
                          "total_tokens": len(prompt) + len(out.completion_ids)}}

    def _apply_stop(self, text: str, shown: list[int], stops: list[str]
                    ) -> tuple[str, int | None]:
        """(text cut before the first stop string, the tokens kept; None: no stop string)."""
        cuts = [text.find(s) for s in stops if s in text]
        if not cuts:
            return text, None
        cut = min(cuts)
        kept = 0  # the tokens whose text lies before the cut
        while kept < len(shown) and len(self._decode(shown[:kept + 1])) <= cut:
            kept += 1
        return text[:cut], kept

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def top_logprobs(self, prompt: list[int], shown: list[int], k: int
                     ) -> list[list[tuple[int, float]]]:
        """The ``k`` most likely (token, logprob) at each answer position: one forward over
        prompt + answer, the LM head only where an answer token is predicted, fp32
        log-softmax."""
        import torch

        from alignkit.models.logps import split_lm
        if not shown:
            return []
        trunk, head = split_lm(self.model)
        device = next(self.model.parameters()).device
        ids = torch.tensor([prompt + shown], device=device)  # (1, T)
        with torch.no_grad(), self.runtime.autocast():
            hidden = trunk(input_ids=ids, attention_mask=torch.ones_like(ids),
                           use_cache=False).last_hidden_state  # (1, T, H)
            # position t predicts token t + 1: the answer tokens are predicted from
            # positions len(prompt) − 1 … len(prompt) + len(shown) − 2
            at = hidden[0, len(prompt) - 1:len(prompt) - 1 + len(shown)]  # (N, H)
            logps = head(at).float().log_softmax(-1)  # (N, V)
        values, indices = logps.topk(min(k, logps.shape[-1]), dim=-1)  # (N, k)
        return [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _logprob_content(self, shown: list[int], logps: list[float],
                         tops: list[list[tuple[int, float]]] | None) -> list[dict]:
        out = []
        for n, token_id in enumerate(shown):
            entry = self._token(token_id, logps[n] if n < len(logps) else 0.0)
            entry["top_logprobs"] = [self._token(i, v) for i, v in tops[n]] if tops else []
            out.append(entry)
        return out

    def models(self, created: int) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model",
                                            "created": created, "owned_by": "alignkit"}]}


# ---------------------------------------------------------------------------------------------
# HTTP


class ModelServer(ThreadingHTTPServer):
    """The server: start it in a thread with :meth:`start`, stop it with :meth:`close` (or use
    it as a context manager). ``url`` is the API root clients use (``…/v1``)."""

    daemon_threads = True  # a request still running never blocks shutdown

    def __init__(self, address: tuple[str, int], engine: Engine, *, api_key: str | None,
                 limits: ServeLimits, hook: Hook | None = None, log: Log | None = None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.engine, self.limits, self.hook, self.log = engine, limits, hook, log
        self._api_key = api_key
        self.created = int(time.time())
        self._count, self._count_lock = 0, threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/v1"

    def next_request(self) -> int:
        with self._count_lock:
            self._count += 1
            return self._count - 1

    def authorised(self, header: str | None) -> bool:
        """No key configured, or ``Authorization: Bearer <key>`` (constant-time compare)."""
        if self._api_key is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("utf-8"), self._api_key.encode("utf-8"))

    def start(self) -> ModelServer:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="alignkit-serve")
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()

    def __enter__(self) -> ModelServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    server: ModelServer
    server_version = "alignkit-serve"
    protocol_version = "HTTP/1.0"  # one request per connection: nothing left half-read

    def setup(self) -> None:
        self.timeout = self.server.limits.read_timeout_s  # a client that stalls mid-body
        super().setup()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's name)
        pass  # the default prints raw request lines; _handle logs its own line

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._handle(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._handle(self._post)

    def _unsupported(self) -> None:
        self._handle(self._no_route)

    do_PUT = do_DELETE = do_PATCH = _unsupported  # noqa: N815

    def _no_route(self) -> dict:
        raise RequestError(404, f"no route {self.command} {self._path()}", code="not_found")

    def _path(self) -> str:
        return urllib.parse.urlsplit(self.path).path.rstrip("/") or "/"

    def _handle(self, route: Callable[[], dict]) -> None:
        start, status, note = time.monotonic(), 200, ""
        self._body_read = False
        try:
            payload = self._checked(route)
        except RequestError as e:
            status, payload = e.status, {"error": {"message": e.message, "type": e.kind,
                                                   "code": e.code}}
        except Exception as e:  # noqa: BLE001 (a bug must not kill the server's thread)
            status, payload = 500, {"error": {"message": f"internal error ({type(e).__name__})",
                                              "type": "server_error", "code": None}}
            note = " ({}: {})".format(type(e).__name__, " ".join(str(e).split())[:200])
        self._send(status, payload)
        if self.server.log is not None:
            self.server.log(f"{self.client_address[0]} {self.command} {self._path()} {status} "
                            f"{1000 * (time.monotonic() - start):.0f} ms{note}")

    def _checked(self, route: Callable[[], dict]) -> dict:
        """The test hook, then the key, then the route."""
        n = self.server.next_request()
        if self.server.hook is not None:
            status = self.server.hook(n)
            if status:
                raise RequestError(status, "failed by the test hook", "server_error")
        if not self.server.authorised(self.headers.get("Authorization")):
            raise RequestError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                               "authentication_error", "invalid_api_key")
        return route()

    def _get(self) -> dict:
        if self._path() != "/v1/models":
            self._no_route()
        return self.server.engine.models(self.server.created)

    def _post(self) -> dict:
        if self._path() != "/v1/chat/completions":
            self._no_route()
        try:
            body = json.loads(self._read_body())
        except (ValueError, UnicodeDecodeError):
            raise _bad("the body is not valid JSON") from None
        engine = self.server.engine
        return engine.complete(parse_request(body, self.server.limits, engine.name))

    def _length(self) -> int:
        raw = self.headers.get("Content-Length")
        try:
            length = int(raw)
        except (TypeError, ValueError):
            raise RequestError(411 if raw is None else 400, "a Content-Length header is "
                               "required") from None
        if length < 0:
            raise _bad("Content-Length must not be negative")
        return length

    def _read_body(self) -> bytes:
        length = self._length()
        if length > self.server.limits.max_body_bytes:
            raise RequestError(413, f"the body has {length} bytes; the limit is "
                                    f"{self.server.limits.max_body_bytes}", code="too_large")
        self._body_read = True
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            raise RequestError(408, "the request body did not arrive in time") from None
        if len(data) < length:
            raise _bad("the body is shorter than its Content-Length")
        return data

    def _drain(self) -> None:
        """Read (and drop) an unread body before answering early (401, 404, 413): closing a
        socket with unread data resets the connection, and the client would see no status."""
        if self._body_read or self.headers.get("Content-Length") is None:
            return
        self._body_read = True
        try:
            remaining = min(self._length(), 64 * self.server.limits.max_body_bytes)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 65536))
                if not chunk:
                    break
                remaining -= len(chunk)
        except (RequestError, OSError):
            pass

    def _send(self, status: int, payload: dict) -> None:
        self._drain()
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client went away (e.g. it timed out)
            pass


def make_server(model, tokenizer, *, host: str = DEFAULT_HOST, port: int = 8000,
                model_name: str = "alignkit", api_key_env: str | None = None,
                template: str = "auto", limits: ServeLimits = ServeLimits(), runtime=None,
                hook: Hook | None = None, log: Log | None = None) -> ModelServer:
    """A :class:`ModelServer` for ``model`` (bound now, not yet serving: call ``start()``).

    ``api_key_env`` names the environment variable holding the key clients must send (None:
    no key); it must be set. ``hook(n)`` (tests only) runs first for request n (0-based) and
    may sleep, or return an HTTP status to answer with instead. ``log`` receives one line per
    request. Port 0 picks a free port (read it from ``server.url``).
    """
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise AlignkitError(f"the API key variable {api_key_env} is not set (or empty); "
                                f"set it, or serve without an API key")
    engine = Engine(model, tokenizer, model_name, template=template, runtime=runtime,
                    limits=limits)
    try:
        return ModelServer((host, port), engine, api_key=api_key, limits=limits, hook=hook,
                           log=log)
    except OSError as e:
        raise AlignkitError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None

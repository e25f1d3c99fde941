"""A minimal client for OpenAI-compatible chat-completions servers, and model spec strings.

Standard library only (``urllib.request``, ``json``), so comparing against a served model (vLLM,
llama.cpp's server, Ollama, TGI, a hosted API) needs nothing installed. One request::

    POST {base_url}/chat/completions
    {"model": M, "messages": [...], "max_tokens": n, "temperature": t, "top_p": p
     [, "logprobs": true, "top_logprobs": k] [, "seed": s]}

What it guarantees:

- The API key is read from the environment variable named by ``api_key_env`` at call time and
  sent as ``Authorization: Bearer …``. It is never stored on the object, logged, or put in an
  error message (a server that echoes it back has it replaced by ``***``). No variable set: no
  header (local servers usually need none).
- Connection errors, timeouts, HTTP 429 and 5xx are retried ``retries`` times, sleeping
  ``backoff · 2^k`` seconds before retry k (k = 0, 1, …; longer when the server's
  ``Retry-After`` asks for it, at most 60 s). Anything else (another 4xx, a body that is not a
  chat completion) fails at once as one line naming the URL (credentials and query removed)
  and the status.

A model spec (``--model`` / ``--judge``) is ``NAME=SOURCE`` or ``SOURCE`` (see
:func:`parse_model_spec`).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import TypeAlias

from alignkit.errors import AlignkitError, InputError

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})  # and any other 5xx
MAX_RETRY_AFTER_S = 60.0
EMBEDDED_SPECS = ("embedded", "default")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


class EndpointError(AlignkitError):
    """A request that failed for good; ``status`` is the HTTP status (None: no response)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message.replace("\n", " "))


def redact_url(url: str) -> str:
    """``url`` without user:password@ and without its query string (either may hold a key)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class Endpoint:
    """An OpenAI-compatible chat-completions endpoint serving ``model`` under ``base_url``.

    ``base_url`` is the API root, e.g. ``http://127.0.0.1:8000/v1``; requests go to
    ``{base_url}/chat/completions``. ``timeout`` (seconds) bounds each attempt; ``retries`` is
    how many times a retryable failure is tried again (at most ``retries + 1`` attempts);
    ``max_concurrency`` bounds the requests :meth:`chat_many` has in flight.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 max_concurrency: int = 4) -> None:
        if retries < 0 or timeout <= 0 or backoff < 0 or max_concurrency < 1:
            raise ValueError("need retries >= 0, timeout > 0, backoff >= 0, max_concurrency >= 1")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env  # the variable's name only: the key is read per request
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_concurrency = max_concurrency

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def describe(self) -> str:
        """``URL#MODEL`` with credentials and query removed: safe for logs and outputs."""
        return f"{redact_url(self.base_url)}#{self.model}"

    def __repr__(self) -> str:
        return f"Endpoint({self.describe()!r})"

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, logprobs: int | None = None, seed: int | None = None) -> dict:
        """One chat completion: ``{"text", "finish_reason", "top_logprobs"}``.

        ``logprobs=k`` asks for the k most likely tokens at every generated position;
        ``top_logprobs`` is then a list (one entry per position) of ``{token: logprob}``, or None
        where the server sent none. ``seed`` is sent only when given (for sampling).
        """
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, "top_p": top_p}
        if logprobs is not None:
            body |= {"logprobs": True, "top_logprobs": logprobs}
        if seed is not None:
            body["seed"] = seed
        return self._parse(self._post(json.dumps(body).encode("utf-8")))

    def chat_many(self, list_of_messages: list[list[dict]], **kw) -> list[dict]:
        """:meth:`chat` for each conversation, at most ``max_concurrency`` at a time; results in
        input order. The first failure (in input order) is raised once the requests in flight
        have finished; requests not yet started are cancelled."""
        if not list_of_messages:
            return []
        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(list_of_messages)))
        try:
            futures = [pool.submit(self.chat, messages, **kw) for messages in list_of_messages]
            return [future.result() for future in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ transport

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, data: bytes) -> bytes:
        """The response body of a successful POST, retrying what may pass (see module doc)."""
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=self._headers(),
                                             method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as err:
                status, detail = err.code, self._detail(err)
                retry_after = _retry_after(err.headers)
                err.close()
                if not (status in RETRY_STATUSES or status >= 500):
                    raise self._error(f"HTTP {status}{detail}", status) from None
                failure = f"HTTP {status}{detail}"
            except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out
                status, retry_after = None, None
                failure = _reason(err, self.timeout)
            if attempt < self.retries:
                time.sleep(max(self.backoff * 2 ** attempt, retry_after or 0.0))
        raise self._error(f"{failure} (gave up after {self.retries + 1} attempts)", status)

    def _detail(self, err: urllib.error.HTTPError) -> str:
        """The server's own error message, short, one line, with the key (if echoed) hidden."""
        try:
            raw = err.read(2000).decode("utf-8", errors="replace")
        except OSError:
            return ""
        try:
            payload = json.loads(raw)
            message = payload.get("error", payload) if isinstance(payload, dict) else payload
            if isinstance(message, dict):
                message = message.get("message", "")
        except ValueError:
            message = raw
        text = " ".join(str(message).split())[:200]
        return f": {self._hide_key(text)}" if text else ""

    def _hide_key(self, text: str) -> str:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return text.replace(key, "***") if key else text

    def _error(self, what: str, status: int | None) -> EndpointError:
        return EndpointError(self._hide_key(f"{redact_url(self.url)}: {what}"), status=status)

    # ------------------------------------------------------------------ response

    def _parse(self, raw: bytes) -> dict:
        """``{"text", "finish_reason", "top_logprobs"}`` of a chat-completions response body."""
        try:
            choice = json.loads(raw.decode("utf-8"))["choices"][0]
            text = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise self._error("HTTP 200: malformed response (expected "
                              "choices[0].message.content)", 200) from None
        if text is not None and not isinstance(text, str):
            raise self._error("HTTP 200: malformed response (content is not a string)", 200)
        return {"text": text or "", "finish_reason": choice.get("finish_reason"),
                "top_logprobs": _top_logprobs(choice.get("logprobs"))}


def _top_logprobs(logprobs) -> list[dict[str, float]] | None:
    """Per generated position, ``{token: logprob}`` of the top alternatives, or None.

    Reads the chat format (``logprobs.content[i].top_logprobs = [{token, logprob}, …]``) and the
    older completions format some servers still send (``logprobs.top_logprobs = [{tok: lp}]``).
    """
    if not isinstance(logprobs, dict):
        return None
    content = logprobs.get("content")
    try:
        if isinstance(content, list):
            return [{alt["token"]: float(alt["logprob"]) for alt in pos.get("top_logprobs") or []}
                    for pos in content]
        legacy = logprobs.get("top_logprobs")
        if isinstance(legacy, list):
            return [{str(t): float(lp) for t, lp in (pos or {}).items()} for pos in legacy]
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return None


def _retry_after(headers) -> float | None:
    """Seconds from a numeric ``Retry-After`` header, capped at :data:`MAX_RETRY_AFTER_S`."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S) if value is not None else None
    except ValueError:
        return None


def _reason(err: BaseException, timeout: float) -> str:
    """A short description of a failed connection (no URL: the caller adds the redacted one)."""
    reason = getattr(err, "reason", err)
    if isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in str(reason):
        return f"no response within {timeout:g} s (timed out)"
    return f"connection failed ({type(reason).__name__}: {' '.join(str(reason).split())[:200]})"


# ---------------------------------------------------------------------------------------------
# Model specs


# What a spec names: a name for load_causal_lm | None (the embedded model) | an endpoint.
ModelSource: TypeAlias = "str | None | Endpoint"


def parse_model_spec(spec: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                     field: str = "model") -> tuple[str, ModelSource]:
    """``(name, source)`` of a spec ``NAME=SOURCE`` or ``SOURCE``.

    SOURCE is one of:

    - ``http(s)://HOST[:PORT]/PATH#MODEL``: an :class:`Endpoint` (base URL before ``#``);
    - ``embedded`` or ``default``: the embedded default model, returned as source ``None``
      (``ModelConfig(name_or_path=None)``);
    - anything else: a string for :func:`alignkit.models.load.load_causal_lm` (hub id, local
      folder, run folder, ``.gguf`` file, ``tiny``). It is not checked here.

    Without ``NAME=`` the name is derived: the endpoint's model, ``embedded``, or the last path
    component of SOURCE (``runs/sft/`` → ``sft``, ``org/model`` → ``model``). ``NAME=`` is
    recognised only where NAME is a plain word (letters, digits, ``_ . + -``), so ``=`` inside a
    path or URL is left alone. Raises :class:`InputError` naming ``field``.
    """
    spec = spec.strip()
    name, source = None, spec
    head, sep, tail = spec.partition("=")
    if sep and _NAME.match(head):
        name, source = head, tail.strip()
    elif sep and not head:
        raise _spec_error(spec, "the name before '=' is empty", field)
    if not source:
        raise _spec_error(spec, "no model source", field)
    if source.lower().startswith(("http://", "https://")):
        endpoint = _endpoint(spec, source, api_key_env, timeout, field)
        return name or endpoint.model, endpoint
    if source in EMBEDDED_SPECS:
        return name or "embedded", None
    derived = os.path.basename(source.rstrip("/\\")) or source
    return name or derived, source


def _endpoint(spec: str, source: str, api_key_env: str, timeout: float, field: str) -> Endpoint:
    url, sep, model = source.partition("#")
    if not sep or not model.strip():
        raise _spec_error(spec, "an endpoint needs its model after '#', e.g. "
                                "http://127.0.0.1:8000/v1#llama3", field)
    try:
        parts = urllib.parse.urlsplit(url)
        valid = bool(parts.hostname) and (parts.port is None or parts.port > 0)  # port may raise
    except ValueError:
        valid = False
    if not valid:
        raise _spec_error(spec, "not a valid http(s) URL", field)
    return Endpoint(url, model.strip(), api_key_env=api_key_env, timeout=timeout)


def _spec_error(spec: str, why: str, field: str) -> InputError:
    shown = spec
    if "://" in spec:  # never echo credentials someone put in a URL
        head, sep, tail = spec.partition("=")
        url = tail if sep and _NAME.match(head) else spec
        base, hash_sep, model = url.partition("#")
        try:
            safe = redact_url(base) + hash_sep + model
        except ValueError:
            safe = "<url>"
        shown = (head + "=" + safe) if sep and _NAME.match(head) else safe
    return InputError(f"bad model spec '{shown}': {why} (expected NAME=SOURCE or SOURCE: "
                      f"embedded, a hub id, a folder, or http(s)://HOST/v1#MODEL)", field=field)

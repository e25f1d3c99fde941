"""`alignkit serve`: an OpenAI-compatible server for a local model (registered on the app in
cli.main); the work lives in alignkit.models.serve."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from alignkit.cli.main import app


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@app.command()
def serve(model: str = typer.Option("embedded", "--model", "-m",
                                    help="Model to serve: embedded, a hub id, a folder or run "
                                         "folder, a .gguf file, or tiny."),
          name: Optional[str] = typer.Option(None, help="Model name clients send (default: "
                                                        "derived from --model)."),
          host: str = typer.Option("127.0.0.1", help="Address to bind. Anything but a "
                                                     "loopback address exposes the model to "
                                                     "the network: set --api-key-env."),
          port: int = typer.Option(8000, help="Port (0: any free port)."),
          api_key_env: Optional[str] = typer.Option(
              None, help="Environment variable holding the API key clients must send as "
                         "'Authorization: Bearer KEY' (default: no key)."),
          template: str = typer.Option("auto", help="chat, inst, plain or auto."),
          max_tokens: int = typer.Option(2048, help="Most tokens a request may ask for."),
          max_body_bytes: int = typer.Option(1_000_000, help="Largest request body (bytes); "
                                                             "larger ones get 413."),
          precision: str = typer.Option("auto", help="auto, bf16 or fp32."),
          quiet: bool = typer.Option(False, "--quiet", help="No per-request log lines."),
          ) -> None:
    """Serve a model over an OpenAI-compatible API (POST /v1/chat/completions with logprobs
    and top_logprobs, GET /v1/models), one generation at a time, until Ctrl-C."""
    from alignkit.config.schema import ModelConfig
    from alignkit.engine.device import resolve_runtime
    from alignkit.errors import InputError
    from alignkit.models.endpoint import Endpoint, parse_model_spec
    from alignkit.models.load import load_causal_lm
    from alignkit.models.serve import ServeLimits, make_server
    spec_name, source = parse_model_spec(model)
    if isinstance(source, Endpoint):
        raise InputError("serve needs a local model, not an endpoint", field="model")
    if max_tokens < 1 or max_body_bytes < 1:
        raise InputError("--max-tokens and --max-body-bytes must be at least 1",
                         field="max_tokens")
    rt = resolve_runtime("auto", precision)
    lm, tokenizer = load_causal_lm(ModelConfig(name_or_path=source), device=rt.device)
    limits = ServeLimits(max_body_bytes=max_body_bytes, max_tokens=max_tokens,
                         default_max_tokens=min(256, max_tokens))
    server = make_server(lm, tokenizer, host=host, port=port, model_name=name or spec_name,
                         api_key_env=api_key_env, template=template, limits=limits, runtime=rt,
                         log=None if quiet else _log)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key_env:
        _log(f"warning: serving on {host} without an API key: anyone who can reach this "
             f"address can use the model")
    _log(f"serving '{server.engine.name}' at {server.url} "
         f"({'API key required' if api_key_env else 'no API key'}); Ctrl-C stops")
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        _log("stopped")
    finally:
        server.server_close()

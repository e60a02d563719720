"""`vqgan serve`: an HTTP API over a tokenizer and its prior (FastAPI, run by uvicorn).

    from vqgan.serve import ServeSettings, create_app
    app = create_app("runs/x/prior", "runs/x/tokenizer", ServeSettings(max_batch=16, api_key="..."))

Modules: `app` (routes, settings), `batcher` (the model worker and dynamic batching), `schemas`
(request and response bodies), `images` (upload checks, PNG encoding), `security` (body limit, API
key), `edit_route` (POST /v1/edit), `cli` (the subcommand); `static/` holds the web page served at `/`.
"""
from __future__ import annotations

from typing import Any

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    # loaded on first use: every `vqgan` command imports the serve subcommand's parser, and the app
    # pulls in FastAPI, torch and the prior (seconds of start-up for, say, `vqgan data collect`)
    if name in __all__:
        from vqgan.serve import app
        return getattr(app, name)
    raise AttributeError(f"module 'vqgan.serve' has no attribute {name!r}")

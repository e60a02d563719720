"""`vqgan serve`: an HTTP API over a tokenizer and its prior (FastAPI, run by uvicorn).

    from vqgan.serve import ServeSettings, create_app
    app = create_app("runs/x/prior", "runs/x/tokenizer", ServeSettings(max_batch=16, api_key="..."))

Modules: `app` (routes, settings), `batcher` (the model worker and dynamic batching), `schemas`
(request and response bodies), `images` (upload checks, PNG encoding), `security` (body limit, API
key), `edit_route` (POST /v1/edit), `cli` (the subcommand); `static/` holds the web page served at `/`.
"""
from vqgan.serve.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]

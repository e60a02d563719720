"""`vqgan serve`: parse the options, build the app, run uvicorn."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from vqgan.serve.app import ServeSettings, create_app

    api_key = args.api_key or os.environ.get("VQGAN_API_KEY") or None
    if args.host not in LOOPBACK and api_key is None:
        print(f"vqgan serve: warning: listening on {args.host} without an API key; anyone who can reach the "
              f"port can use the model (set --api-key or $VQGAN_API_KEY)", file=sys.stderr)
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue,
                             max_n=args.max_n, max_upload_bytes=int(args.max_upload_mb * 2**20),
                             max_pixels=args.max_pixels, api_key=api_key, cors_origins=tuple(args.cors_origin or ()),
                             device=args.device)
    app = create_app(args.prior, args.tokenizer, settings)
    print(f"serving on http://{args.host}:{args.port} (API docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a prior + tokenizer over HTTP (generate, stream, encode, edit)",
                       description="Run an HTTP API (FastAPI + uvicorn): /v1/generate with dynamic batching, "
                                   "/v1/generate/stream (server-sent partial images), /v1/encode, /v1/decode, "
                                   "/v1/reconstruct, /v1/edit, /v1/models, /health; docs at /docs.",
                       epilog="example: vqgan serve --prior runs/tiny/stage2/prior "
                              "--tokenizer runs/tiny/stage1/tokenizer --port 8000\n"
                              "  curl -X POST localhost:8000/v1/generate -H 'Content-Type: application/json' "
                              "-d '{\"class\": 0, \"seed\": 1}' -o out.png",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prior", required=True, type=Path, help="directory written by train-prior (OUT/prior)")
    p.add_argument("--tokenizer", required=True, type=Path, help="the tokenizer the prior was trained with")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=_positive(int), default=16,
                   help="images per sampling call; concurrent requests are merged up to this many")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="how long to wait for requests to fill a batch")
    p.add_argument("--queue", type=_positive(int), default=64, help="queued requests before answering 503")
    p.add_argument("--max-n", type=_positive(int), default=None, help="images per request (default: 4 x --max-batch)")
    p.add_argument("--max-upload-mb", type=_positive(float), default=8.0, help="request body limit")
    p.add_argument("--max-pixels", type=_positive(int), default=4096 * 4096, help="pixels of an uploaded image")
    p.add_argument("--api-key", default=None,
                   help="require this key on every /v1 route (default: $VQGAN_API_KEY, which other users "
                        "cannot see in 'ps' as they can a flag; neither = open)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="allow browser pages from this origin (repeatable); CORS is off without it")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_cmd_serve)

"""The HTTP API: `create_app(prior_dir, tokenizer_dir, settings)` -> a FastAPI app (run it with uvicorn).

    GET  /health                 liveness and queue depth (no key needed)
    GET  /v1/models              tokenizer and prior configs, class names, code grid, hashes, limits
    POST /v1/generate            JSON options -> image/png (n = 1) or JSON of base64 PNGs and seeds
    POST /v1/generate/stream     server-sent events: partial PNGs every k code rows, then the final one
    POST /v1/encode              image upload -> codes JSON
    POST /v1/decode              codes JSON -> image/png
    POST /v1/reconstruct         image upload -> image/png (encode + decode)
    POST /v1/edit                multipart: inpaint | transfer | mix | interpolate -> PNG or JSON
    GET  /docs                   OpenAPI docs
    GET  /                       the web page (static/: HTML, JS and CSS, no build step; no key needed)

All model work runs on the `Batcher`'s worker thread; routes validate, queue and wait. No route
takes a file-system path: models come from the command line, images and codes from the request.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import torch
from fastapi import APIRouter, Depends, FastAPI, File, HTTPException, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from stage2_prior import PriorLoadError
from stage2_prior.images import load_pair
from vqgan.serve.batcher import Batcher, CallJob, GenerateJob, QueueFull, Sampling
from vqgan.serve.images import UploadError, b64, image_tensor, png_bytes, read_image
from vqgan.serve.schemas import (BUSY_RESPONSE, PNG_RESPONSE, DecodeRequest, EncodeResponse, GeneratedImage,
                                 GenerateRequest, GenerateResponse, Health, SamplingOptions, StreamRequest,
                                 unprocessable)
from vqgan.serve.security import BodyLimit, api_key_dependency

STATIC = Path(__file__).parent / "static"
# the page loads nothing from elsewhere: no CDN, no fonts; images arrive as data: and blob: URLs
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
            "frame-ancestors 'none'")


@dataclass
class ServeSettings:
    max_batch: int = 16                   # images per sampling call (every call is padded to this many rows)
    max_wait_ms: float = 10.0             # how long the worker waits for more requests to fill a batch
    queue_size: int = 64                  # queued requests before 503
    max_n: int | None = None              # images per request; None = 4 * max_batch
    max_upload_bytes: int = 8 * 2**20     # whole request body
    max_pixels: int = 4096 * 4096         # of an uploaded image, checked before decoding it
    api_key: str | None = None            # required on every /v1 route when set
    cors_origins: tuple[str, ...] = ()    # CORS is off unless origins are given
    device: str | None = None             # default: cuda when available, else cpu


class Server:
    """The loaded models, the batcher and the settings, with the checks routes share."""

    def __init__(self, prior_dir: str | Path, tokenizer_dir: str | Path, settings: ServeSettings):
        device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.prior, self.tokenizer = load_pair(prior_dir, tokenizer_dir, device=device)
        self.settings, self.device = settings, torch.device(device)
        self.max_n = settings.max_n or 4 * settings.max_batch
        # images are served at the size the prior's codes came from (`vqgan encode --resolution` may
        # differ from the tokenizer's training resolution), so encode -> edit -> decode fits the prior
        self.code_shape = tuple(self.prior.code_shape)
        h, w = self.code_shape[:2]
        if h != w:
            raise PriorLoadError(f"the prior models a {h}x{w} code grid; vqgan serve handles square images only")
        self.resolution = h * self.tokenizer.code_factor
        self.batcher = Batcher(self.prior, self.tokenizer, max_batch=settings.max_batch,
                               max_wait_s=settings.max_wait_ms / 1000, queue_size=settings.queue_size)
        weights = Path(prior_dir) / "model.safetensors"
        self.models_info = {
            "image_size": self.resolution,  # uploads are resized and centre-cropped to it; boxes use it
            "tokenizer": {"config": self.tokenizer.config_dict(), "content_hash": self.tokenizer.content_hash(),
                          "code_shape": list(self.code_shape), "code_factor": self.tokenizer.code_factor,
                          "vocab_sizes": self.tokenizer.vocab_sizes},
            "prior": {"config": self.prior.config_dict(self.prior.tokenizer_hash, self.prior.tokenizer_config),
                      "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                      "num_classes": self.prior.config.num_classes, "class_names": self.prior.class_names},
            "limits": {"max_batch": settings.max_batch, "max_n": self.max_n, "queue_size": settings.queue_size,
                       "max_upload_bytes": settings.max_upload_bytes, "max_pixels": settings.max_pixels},
        }

    def resolve_class(self, value: int | str | None, field: str = "class") -> int | None:
        """A class id or name -> the id; 422 when the prior has no such class."""
        if value is None:
            return None
        num, names = self.prior.config.num_classes, self.prior.class_names or []
        if num == 0:
            raise unprocessable(field, "this prior is unconditional: send class null")
        if isinstance(value, str):
            if value in names:
                return names.index(value)
            if not value.strip().lstrip("-").isdigit():
                raise unprocessable(field, f"unknown class name {value!r}; known: {names or 'none (use ids)'}")
            value = int(value)
        if not 0 <= value < num:
            raise unprocessable(field, f"class id {value} is out of range: this prior has classes 0..{num - 1}")
        return value

    def sampling(self, body: SamplingOptions, label: int | None) -> Sampling:
        if body.cfg != 1.0 and self.prior.config.num_classes == 0:
            raise unprocessable("cfg", "classifier-free guidance needs a class-conditional prior; send cfg 1")
        if self.prior.prior_type != "masked":
            for name in ("decode_steps", "choice_temperature"):
                if getattr(body, name) is not None:
                    raise unprocessable(name, f"{name} applies to masked priors; this prior is autoregressive: "
                                              f"leave it out")
        # without a class there is nothing to guide: cfg has no effect, so such requests share batches
        return Sampling(body.cfg if label is not None else 1.0, body.temperature, body.top_k, body.top_p,
                        body.decode_steps, body.choice_temperature)

    def submit(self, job: Any) -> Any:
        try:
            return self.batcher.submit(job)
        except QueueFull as e:
            raise HTTPException(503, str(e), headers={"Retry-After": str(e.retry_after)}) from None
        except RuntimeError as e:
            raise HTTPException(503, str(e)) from None

    async def wait(self, job: Any) -> Any:
        """Queue a job and await its result; a ValueError from the model is the request's fault: 422."""
        future = self.submit(job)
        try:
            return await asyncio.wrap_future(future)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None

    async def run(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the model worker (in queue order) and await its result."""
        return await self.wait(CallJob(fn))

    async def image(self, upload: UploadFile, field: str, to_tensor: Callable = image_tensor) -> torch.Tensor:
        """An uploaded image -> `to_tensor(image, R)`, by default (3, R, R) in [-1, 1]. Decoding and resizing
        run in a worker thread: a large upload would otherwise stall every other request on the event loop."""
        data = await upload.read()

        def convert() -> torch.Tensor:
            return to_tensor(read_image(data, upload.content_type, self.settings.max_pixels, field), self.resolution)

        try:
            return await run_in_threadpool(convert)
        except UploadError as e:
            raise HTTPException(e.status, e.message) from None


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _v1_routes(server: Server) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(api_key_dependency(server.settings.api_key))])
    tokenizer, device = server.tokenizer, server.device

    @router.get("/models", summary="tokenizer and prior configs, class names, code grid, content hashes, limits")
    async def models() -> dict:
        return server.models_info

    @router.post("/generate", summary="generate images", responses={
        200: {"content": {"image/png": {}, "application/json": {"schema": GenerateResponse.model_json_schema()}},
              "description": "n = 1: the PNG (seed in the X-Seed header); n > 1: JSON of base64 PNGs"},
        **BUSY_RESPONSE})
    async def generate_images(body: GenerateRequest) -> Response:
        if body.n > server.max_n:
            raise unprocessable("n", f"n={body.n} exceeds this server's limit of {server.max_n} images per request")
        label = server.resolve_class(body.class_)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        job = GenerateJob(label, [seed + i for i in range(body.n)], server.sampling(body, label))
        pngs = await server.wait(job)
        if body.n == 1:
            return Response(pngs[0], media_type="image/png", headers={"X-Seed": str(seed)})
        images = [GeneratedImage(seed=seed + i, png=b64(png)) for i, png in enumerate(pngs)]
        return JSONResponse(GenerateResponse(class_=label, images=images).model_dump(by_alias=True))

    @router.post("/generate/stream", summary="generate one image, streaming partial images (server-sent events)",
                 response_class=StreamingResponse, responses={
                     200: {"content": {"text/event-stream": {}},
                           "description": "events `partial` {rows, of, png, ms}, then `final` {png, seed, "
                                          "time_to_first_partial_ms, total_ms} (or `error` {detail})"},
                     **BUSY_RESPONSE})
    async def generate_stream(body: StreamRequest) -> StreamingResponse:
        label = server.resolve_class(body.class_)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = GenerateJob(label, [seed], server.sampling(body, label), every_rows=body.every_rows,
                          on_partial=lambda event: loop.call_soon_threadsafe(events.put_nowait, ("partial", event)))
        future = server.submit(job)  # a full queue is a 503 here, before the stream starts
        # the done callback runs on the worker after every partial was scheduled, so it arrives last
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, ("done", None)))

        async def stream() -> AsyncIterator[str]:
            try:
                while True:
                    kind, event = await events.get()
                    if kind == "partial":
                        yield _sse("partial", event)
                        continue
                    try:
                        pngs = future.result()
                    except Exception as e:
                        yield _sse("error", {"detail": str(e)})
                        return
                    first = job.first_partial_s
                    yield _sse("final", {"png": b64(pngs[0]), "seed": seed,
                                         "time_to_first_partial_ms": None if first is None else round(1000 * first, 1),
                                         "total_ms": round(1000 * (time.perf_counter() - job.received), 1)})
                    return
            finally:  # the client may have gone: drop the job if still queued, stop its partials
                job.gone = True
                future.cancel()

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.post("/encode", summary="image -> codes", response_model=EncodeResponse, responses=BUSY_RESPONSE)
    async def encode(image: UploadFile = File(description="PNG, JPEG, WebP or BMP; resized and centre-cropped "
                                                          "to image_size (/v1/models)")) -> EncodeResponse:
        pixels = await server.image(image, "image")
        codes = await server.run(lambda: tokenizer.encode(pixels[None].to(device))[0].cpu())
        return EncodeResponse(codes=codes.tolist(), shape=list(codes.shape),
                              tokenizer_hash=server.models_info["tokenizer"]["content_hash"])

    @router.post("/decode", summary="codes -> image", response_class=Response,
                 responses={**PNG_RESPONSE, **BUSY_RESPONSE})
    async def decode(body: DecodeRequest) -> Response:
        try:
            codes = torch.tensor(body.codes, dtype=torch.long)
        except (ValueError, TypeError):
            raise unprocessable("codes", "codes must be a rectangular grid of integers") from None
        if tuple(codes.shape) != tuple(server.code_shape):
            raise unprocessable("codes", f"codes have shape {list(codes.shape)}; this server's code grid "
                                         f"(for {server.resolution} px images) is {list(server.code_shape)}")
        png = await server.run(lambda: png_bytes(tokenizer.decode(codes[None].to(device))[0]))
        return Response(png, media_type="image/png")

    @router.post("/reconstruct", summary="image -> codes -> image", response_class=Response,
                 responses={**PNG_RESPONSE, **BUSY_RESPONSE})
    async def reconstruct(image: UploadFile = File(description="PNG, JPEG, WebP or BMP")) -> Response:
        pixels = await server.image(image, "image")
        png = await server.run(lambda: png_bytes(tokenizer.decode(tokenizer.encode(pixels[None].to(device)))[0]))
        return Response(png, media_type="image/png")

    from vqgan.serve.edit_route import add_edit_route
    add_edit_route(router, server)
    return router


def create_app(prior_dir: str | Path, tokenizer_dir: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """Load the prior and tokenizer and build the app; the model worker runs while the app does (lifespan)."""
    settings = settings or ServeSettings()
    server = Server(prior_dir, tokenizer_dir, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(server.batcher.stop)

    app = FastAPI(title="vqgan serve", version="1", lifespan=lifespan,
                  description="Generate, stream, encode, decode and edit images with a VQGAN tokenizer and its "
                              "prior (autoregressive or masked). Send the API key as `Authorization: Bearer KEY` or "
                              "`X-API-Key` when the server has one.")
    app.state.server = server

    @app.get("/health", response_model=Health, summary="liveness; needs no API key")
    async def health() -> Health:
        calls = list(server.batcher.calls)
        return Health(status="ok", queued=server.batcher.queue.qsize(), max_batch=settings.max_batch,
                      requests_per_call=round(sum(calls) / len(calls), 2) if calls else None)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")  # the page's JS and CSS: public files
    app.include_router(_v1_routes(server))
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    if settings.cors_origins:  # added last, so it is outermost: even a 413 carries the CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"],
                           expose_headers=["X-Seed", "Retry-After"])
    return app

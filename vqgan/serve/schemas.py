"""Request and response bodies of the HTTP API. Field bounds make out-of-range values a 422 before
any work is queued; limits that depend on the server's settings or the model (n against --max-n,
class ids, code grids) are checked in the routes and answered 422 in the same shape."""
from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**53 - 1  # JSON numbers above this lose precision in JavaScript
HARD_MAX_N = 1024     # the schema's bound; the server's --max-n is usually lower

# extra OpenAPI responses of the routes
PNG_RESPONSE: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}, "description": "a PNG image"}}
BUSY_RESPONSE: dict[int | str, dict[str, Any]] = {503: {"description": "queue full; see the Retry-After header"}}


def unprocessable(field: str, message: str) -> HTTPException:
    """A 422 in FastAPI's own validation-error shape, for checks the schema cannot express."""
    return HTTPException(422, [{"loc": ["body", field], "msg": message, "type": "value_error"}])


class SamplingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    cfg: float = Field(1.0, ge=0.0, le=50.0, description="classifier-free guidance scale; 1 = off; no effect "
                                                         "without a class")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="softmax temperature; 0 = greedy")
    top_k: int | None = Field(None, ge=1, le=1_000_000, description="sample among the k most likely codes")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="nucleus sampling mass")
    decode_steps: int | None = Field(None, ge=1, le=256, description="masked priors only: parallel decoding "
                                                                     "passes (default 8)")
    choice_temperature: float | None = Field(None, ge=0.0, le=100.0, description="masked priors only: "
                                             "confidence noise at the first decoding step (default 4.5)")


class GenerateRequest(SamplingOptions):
    class_: int | str | None = Field(None, alias="class",
                                     description="class id or name (see /v1/models); null = unconditional")
    n: int = Field(1, ge=1, le=HARD_MAX_N, description="images; 1 answers image/png, more answer JSON")
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="image i uses seed + i; random when omitted (returned either way)")


class StreamRequest(SamplingOptions):
    class_: int | str | None = Field(None, alias="class", description="class id or name; null = unconditional")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when omitted (sent in the final event)")
    every_rows: int = Field(1, ge=1, le=4096, description="send a partial image every k completed code rows "
                                                          "(masked priors: every k decoding steps)")


class GeneratedImage(BaseModel):
    seed: int
    png: str = Field(description="base64-encoded PNG")


class GenerateResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    class_: int | None = Field(alias="class")
    images: list[GeneratedImage]


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    codes: list[list[int]] | list[list[list[int]]] = Field(
        description="one code grid, (h, w) or (h, w, D) for a tokenizer with D codes per position")


class EncodeResponse(BaseModel):
    codes: list[list[int]] | list[list[list[int]]]
    shape: list[int]
    tokenizer_hash: str


class EditedImages(BaseModel):
    operation: str
    seed: int
    images: list[str] = Field(description="base64-encoded PNGs")


class Health(BaseModel):
    status: str
    queued: int = Field(description="requests waiting for the model worker")
    max_batch: int
    requests_per_call: float | None = Field(description="mean requests merged per sampling call, last 256 calls")

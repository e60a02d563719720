"""`vqgan serve` with a masked (MaskGIT) prior: decode_steps / choice_temperature on /v1/generate,
/v1/generate/stream and /v1/edit, the step-wise partial images of the stream, the prior type in
/v1/models and on the page, and the 422 an autoregressive prior answers to the masked-only options.
Every app runs in-process through FastAPI's test client, at max_batch 4, on tiny models (conftest)."""
from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import serve_client
from stage2_prior.masked_sample import DEFAULT_CHOICE_TEMPERATURE, DEFAULT_STEPS
from vqgan.serve.app import STATIC

pytestmark = pytest.mark.usefixtures("one_thread")
GRID, FACTOR = 8, 2          # tiny_stage2: 16 px images, 8x8 codes of 16
MASKED_OPTIONS = ("decode_steps", "choice_temperature")


# ---- fixtures and helpers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def masked_dirs(tiny_stage2, tiny_masked) -> tuple[Path, Path]:
    return tiny_masked, tiny_stage2 / "tokenizer"


@pytest.fixture(scope="module")
def ar_dirs(tiny_stage2) -> tuple[Path, Path]:
    return tiny_stage2 / "prior_run" / "prior", tiny_stage2 / "tokenizer"


@pytest.fixture(scope="module")
def masked(masked_dirs):
    with serve_client(masked_dirs) as c:
        yield c


@pytest.fixture(scope="module")
def ar(ar_dirs):
    with serve_client(ar_dirs) as c:
        yield c


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def _png(size=(16, 16), colour=(200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _images(response) -> list[bytes]:
    assert response.status_code == 200, response.text
    return [base64.b64decode(image["png"]) for image in response.json()["images"]]


def _events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def _grey_positions(png: bytes) -> np.ndarray:
    """(h, w) bool: code positions whose FACTOR x FACTOR pixels are all mid-grey (128): not decoded yet."""
    pixels = _pixels(png).reshape(GRID, FACTOR, GRID, FACTOR, 3)
    return (pixels == 128).all(axis=(1, 3, 4))


def _refused_field(response, field: str) -> None:
    assert response.status_code == 422, response.text
    assert field in json.dumps(response.json()["detail"]), response.text


# ---- /v1/generate ---------------------------------------------------------------------------------
def test_masked_generate_is_seeded_and_follows_decode_steps(masked):
    request = {"class": 1, "seed": 7, "n": 2, "decode_steps": 4}
    first = _images(masked.post("/v1/generate", json=request))
    assert len(first) == 2 and all(_pixels(png).shape == (16, 16, 3) for png in first)
    assert first[0] != first[1]                                            # seeds 7 and 8
    assert _images(masked.post("/v1/generate", json=request)) == first     # the same request: the same bytes
    other_steps = _images(masked.post("/v1/generate", json={**request, "decode_steps": 2}))
    assert other_steps[0] != first[0] and other_steps[1] != first[1]
    # image i is seed + i whatever n is (per-row generators): seed 8 alone on row 0 == row 1 above
    alone = masked.post("/v1/generate", json={**request, "seed": 8, "n": 1})
    assert alone.headers["content-type"] == "image/png" and alone.headers["x-seed"] == "8"
    assert alone.content == first[1]


def test_masked_generate_defaults_and_choice_temperature(masked):
    base = {"class": 2, "seed": 3}
    default = masked.post("/v1/generate", json=base).content
    spelled = masked.post("/v1/generate", json={**base, "decode_steps": DEFAULT_STEPS,
                                                 "choice_temperature": DEFAULT_CHOICE_TEMPERATURE}).content
    assert default == spelled                                # omitted options are the sampler's defaults
    greedy_choice = masked.post("/v1/generate", json={**base, "choice_temperature": 0}).content
    assert greedy_choice != default
    for body in [{"decode_steps": 0}, {"decode_steps": 257}, {"decode_steps": 2.5},
                 {"choice_temperature": -0.1}, {"choice_temperature": 100.5}]:
        _refused_field(masked.post("/v1/generate", json={**base, **body}), next(iter(body)))


def test_masked_generate_unconditional_and_class_conditional(masked, monkeypatch):
    import vqgan.serve.batcher as batcher_module

    calls: list[dict] = []
    real_generate = batcher_module.generate

    def spy(prior, n=None, **kwargs):  # what reaches the sampler (the tiny prior barely reacts to classes)
        calls.append({"n": n, **kwargs})
        return real_generate(prior, n, **kwargs)

    monkeypatch.setattr(batcher_module, "generate", spy)
    info = masked.get("/v1/models").json()
    assert info["prior"]["num_classes"] == 3
    unconditional = masked.post("/v1/generate", json={"seed": 1, "decode_steps": 4})
    assert unconditional.status_code == 200 and _pixels(unconditional.content).shape == (16, 16, 3)
    assert calls[-1]["labels"] is None and calls[-1]["n"] == 4 and calls[-1]["steps"] == 4
    for k in range(info["prior"]["num_classes"]):
        conditional = masked.post("/v1/generate", json={"class": k, "seed": 1, "decode_steps": 4,
                                                         "choice_temperature": 2.0, "cfg": 3.0})
        assert conditional.status_code == 200 and _pixels(conditional.content).shape == (16, 16, 3)
        sent = calls[-1]
        assert sent["n"] is None and sent["labels"].tolist() == [k, 0, 0, 0]       # padded to max_batch rows
        assert (sent["steps"], sent["choice_temperature"], sent["cfg_scale"]) == (4, 2.0, 3.0)
    _refused_field(masked.post("/v1/generate", json={"class": 3, "decode_steps": 4}), "class")


# ---- the autoregressive prior refuses the masked-only options -------------------------------------
@pytest.mark.parametrize("field, value", [("decode_steps", 4), ("choice_temperature", 1.0)])
def test_ar_prior_refuses_masked_options(ar, field, value):
    for path in ("/v1/generate", "/v1/generate/stream"):
        refused = ar.post(path, json={"class": 1, "seed": 1, field: value})
        _refused_field(refused, field)
        assert refused.json()["detail"][0]["loc"] == ["body", field]
        other = next(name for name in MASKED_OPTIONS if name != field)
        assert other not in json.dumps(refused.json()["detail"])          # names the field that was sent


def test_ar_prior_still_generates_without_masked_options(ar):
    assert ar.post("/v1/generate", json={"class": 1, "seed": 1}).status_code == 200


# ---- /v1/generate/stream --------------------------------------------------------------------------
def test_masked_stream_sends_decoding_steps_then_the_final_image(masked):
    request = {"class": 2, "seed": 5, "decode_steps": 4}
    with masked.stream("POST", "/v1/generate/stream", json={**request, "every_rows": 1}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = _events(response.read().decode())
    assert [kind for kind, _ in events] == ["partial"] * 3 + ["final"]
    partials = [event for _, event in events[:-1]]
    assert all(set(event) == {"step", "of", "png", "ms"} for event in partials)      # no AR "rows"
    assert [event["step"] for event in partials] == [1, 2, 3] and all(event["of"] == 4 for event in partials)
    assert all(a["ms"] <= b["ms"] for a, b in zip(partials, partials[1:]))
    greys = [_grey_positions(base64.b64decode(event["png"])) for event in partials]
    # cosine schedule over 64 free positions: floor(cos(pi/2 * s/4) * 64) stay masked after step s
    assert [int(g.sum()) for g in greys] == [59, 45, 24]
    assert all((later <= earlier).all() for earlier, later in zip(greys, greys[1:]))  # decided codes stay
    final = events[-1][1]
    assert final["seed"] == 5 and 0 < final["time_to_first_partial_ms"] <= final["total_ms"]
    final_png = base64.b64decode(final["png"])
    assert not _grey_positions(final_png).any()
    # by design the same: one row of seed 5 padded to max_batch rows, the same options, so the same call
    assert final_png == masked.post("/v1/generate", json=request).content


def test_masked_stream_every_k_steps(masked):
    request = {"seed": 9, "decode_steps": 4}                               # unconditional
    sparse = _events(masked.post("/v1/generate/stream", json={**request, "every_rows": 2}).text)
    assert [(kind, event.get("step")) for kind, event in sparse] == [("partial", 2), ("final", None)]
    only_final = _events(masked.post("/v1/generate/stream", json={**request, "every_rows": 4}).text)
    assert len(only_final) == 1 and only_final[0][1]["time_to_first_partial_ms"] is None
    one_step = _events(masked.post("/v1/generate/stream", json={**request, "decode_steps": 1}).text)
    assert [kind for kind, _ in one_step] == ["final"]
    assert base64.b64decode(sparse[-1][1]["png"]) == base64.b64decode(only_final[0][1]["png"]) == \
        masked.post("/v1/generate", json=request).content


def test_masked_stream_never_sends_the_finished_image_as_a_partial(masked):
    events = _events(masked.post("/v1/generate/stream", json={"seed": 5, "decode_steps": 100}).text)
    assert events[-1][0] == "final"
    partials = [event for kind, event in events if kind == "partial"]
    assert all(_grey_positions(base64.b64decode(event["png"])).any() for event in partials)
    assert len(partials) == 63 and all(event["of"] == 64 for event in partials)  # 64 free positions: 64 passes


# ---- /v1/edit -------------------------------------------------------------------------------------
def test_masked_edit_inpaint_follows_decode_steps(masked):
    form = {"operation": "inpaint", "box": "0,8,16,16", "seed": "3", "decode_steps": "4"}
    files = {"image": ("x.png", _png(), "image/png")}
    inpainted = masked.post("/v1/edit", data=form, files=files)
    assert inpainted.status_code == 200, inpainted.text
    assert inpainted.headers["content-type"] == "image/png" and inpainted.headers["x-seed"] == "3"
    assert _pixels(inpainted.content).shape == (16, 16, 3)
    assert masked.post("/v1/edit", data=form, files=files).content == inpainted.content
    assert masked.post("/v1/edit", data={**form, "decode_steps": "2"}, files=files).content != inpainted.content
    tempered = masked.post("/v1/edit", data={**form, "choice_temperature": "0"}, files=files)
    assert tempered.status_code == 200 and tempered.content != inpainted.content
    transfer = masked.post("/v1/edit", data={"operation": "transfer", "class": "2", "decode_steps": "4"},
                           files=files)
    assert transfer.status_code == 200 and _pixels(transfer.content).shape == (16, 16, 3)
    _refused_field(masked.post("/v1/edit", data={**form, "decode_steps": "0"}, files=files), "decode_steps")


@pytest.mark.parametrize("field, value", [("decode_steps", "4"), ("choice_temperature", "1.5")])
def test_ar_edit_refuses_masked_options(ar, field, value):
    refused = ar.post("/v1/edit", data={"operation": "inpaint", "box": "0,8,16,16", field: value},
                      files={"image": ("x.png", _png(), "image/png")})
    _refused_field(refused, field)
    assert refused.json()["detail"][0]["loc"] == ["body", field]


# ---- /v1/models and the page ----------------------------------------------------------------------
def test_models_report_the_prior_type(masked, ar):
    info = masked.get("/v1/models").json()
    assert info["prior"]["config"]["config"]["prior_type"] == "masked"
    assert info["prior"]["config"]["config"]["mask_schedule"] == "cosine"
    assert info["prior"]["num_classes"] == 3 and info["tokenizer"]["code_shape"] == [GRID, GRID]
    assert info["prior"]["config"]["tokenizer_hash"] == info["tokenizer"]["content_hash"]
    assert ar.get("/v1/models").json()["prior"]["config"]["config"]["prior_type"] == "ar"


def test_page_has_the_decode_steps_input_for_masked_priors(masked, ar):
    page = masked.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text == ar.get("/").text                    # one static page; the script shows the input
    inputs = re.findall(r"<input\b[^>]*>", page.text)
    steps = [tag for tag in inputs if 'name="decode_steps"' in tag]
    assert len(steps) == 1
    tag = steps[0]
    assert re.search(r'\bclass="[^"]*\bmasked-only\b', tag) and re.search(r"\shidden\b", tag)
    assert 'min="1"' in tag and 'max="256"' in tag                        # the API's bounds
    input_id = re.search(r'\bid="([^"]+)"', tag).group(1)
    label = re.search(rf'<label\b[^>]*\bfor="{input_id}"[^>]*>([^<]*)</label>', page.text)
    assert label and "masked-only" in label.group(0) and label.group(1) == "Decoding steps"
    # the script decides "masked" from a path into /v1/models: that path must exist in the JSON
    script = (STATIC / "app.js").read_text()
    assert masked.get("/static/app.js").text == script
    path = re.search(r"info\.([\w.]+) === \"masked\"", script).group(1).split(".")
    for client, expected in [(masked, "masked"), (ar, "ar")]:
        value = client.get("/v1/models").json()
        for key in path:
            value = value[key]
        assert value == expected

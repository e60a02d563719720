"""The web page of `vqgan serve` in a real browser: a live server started by the console script on
127.0.0.1, headless Chromium driven by Playwright. The browser is the system's chromium binary
(Debian's package; $VQGAN_CHROMIUM overrides), not Playwright's own download; without one, or
without playwright, the test is skipped with the reason."""
from __future__ import annotations

import base64
import io
import os
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import live_server

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")

KEY = "browser-key"
CHROMIUM = os.environ.get("VQGAN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# checked before any fixture is built: a machine without a browser skips at once
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="no chromium binary on PATH: install Debian's chromium "
                                "package (.ci/run does) or set VQGAN_CHROMIUM to a Chromium executable")


def _page_bytes(page, expression: str) -> bytes:
    """Bytes of a Blob the page computes (an async JS expression), fetched through base64."""
    return base64.b64decode(page.evaluate(f"""async () => {{
        const bytes = new Uint8Array(await (await {expression}).arrayBuffer());
        return btoa(Array.from(bytes, (b) => String.fromCharCode(b)).join(""));
    }}"""))


def _pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def _shown_pixels(page, selector: str) -> np.ndarray:
    """The RGB pixels of an <img> as the page decoded them, (H, W, 3)."""
    width, height, values = page.eval_on_selector(selector, """img => {
        const canvas = Object.assign(document.createElement("canvas"), {width: img.naturalWidth,
                                                                        height: img.naturalHeight});
        const ctx = canvas.getContext("2d");
        ctx.drawImage(img, 0, 0);
        return [canvas.width, canvas.height, Array.from(ctx.getImageData(0, 0, canvas.width, canvas.height).data)];
    }""")
    return np.asarray(values, np.uint8).reshape(height, width, 4)[..., :3]


def _filled(selector: str, alt_prefix: str = "") -> str:
    """JS: true once the <img> has decoded pixels (and, when given, an alt text saying which result it is)."""
    return (f"() => {{ const img = document.querySelector('{selector}'); return img.complete && "
            f"img.naturalWidth > 0 && img.alt.startsWith('{alt_prefix}'); }}")


@pytest.mark.slow
def test_page_generates_streams_and_edits_in_chromium(tiny_stage2, tmp_path):
    upload = tmp_path / "upload.png"
    Image.new("RGB", (24, 16), (200, 40, 40)).save(upload)  # not the served 16x16: the server crops it
    prior, tokenizer = tiny_stage2 / "prior_run" / "prior", tiny_stage2 / "tokenizer"

    with live_server(prior, tokenizer, KEY) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.set_default_timeout(20_000)
            js_errors: list[str] = []
            page.on("pageerror", lambda error: js_errors.append(str(error)))
            page.goto(url)

            # no key yet: /v1/models answers 401 and the page shows the server's message
            sync_api.expect(page.locator("#models-error")).to_contain_text("missing API key")
            page.fill("#api-key", KEY)
            page.press("#api-key", "Tab")  # change event: the classes load with the key
            sync_api.expect(page.locator("#class option")).to_have_count(4)  # 3 classes + unconditional
            assert page.is_hidden("#models-error")
            assert page.evaluate("sessionStorage.getItem('vqgan-api-key')") == KEY

            # generate: partial images stream in, then the final one with the server's timings
            page.select_option("#class", index=1)
            page.fill("#cfg", "2")
            page.fill("#temperature", "1")
            page.fill("#seed", "1234")
            page.click("#generate")
            page.wait_for_function("() => document.getElementById('generated').dataset.state === 'final'")
            assert page.evaluate(_filled("#generated", "Generated image, seed 1234"))
            assert int(page.get_attribute("#generated", "data-partials")) >= 1
            sync_api.expect(page.locator("#generate-timings")).to_contain_text("first partial image:")
            sync_api.expect(page.locator("#generate-timings")).to_contain_text("total:")
            shown = base64.b64decode(page.get_attribute("#generated", "src").split(",", 1)[1])
            label = page.eval_on_selector("#class", "select => select.value")
            direct = httpx.post(f"{url}/v1/generate", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                                json={"class": label, "cfg": 2, "temperature": 1, "seed": 1234})
            assert direct.status_code == 200 and shown == direct.content  # the final image is the server's

            # reconstruct an upload, then inpaint it with a drawn mask
            page.set_input_files("#upload", str(upload))
            page.click("#run-edit")
            page.wait_for_function(_filled("#edited", "Result of reconstruct"))
            direct = httpx.post(f"{url}/v1/reconstruct", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                                files={"image": ("upload.png", upload.read_bytes(), "image/png")})
            assert (_shown_pixels(page, "#edited") == _pixels(direct.content)).all()
            page.select_option("#operation", "inpaint")
            page.click("#run-edit")  # nothing drawn: the server's 422 is shown
            sync_api.expect(page.locator("#edit-error")).to_contain_text("needs a mask")
            box = page.locator("#mask").bounding_box()
            y = box["y"] + 0.75 * box["height"]
            page.mouse.move(box["x"] + 0.1 * box["width"], y)
            page.mouse.down()
            page.mouse.move(box["x"] + 0.9 * box["width"], y, steps=8)
            page.mouse.up()
            page.click("#run-edit")
            page.wait_for_function(_filled("#edited", "Result of inpaint, seed 1234"))
            mask_png = _page_bytes(page, "maskPng()")                   # white = edit, at the upload's own size
            with Image.open(io.BytesIO(mask_png)) as mask:
                assert mask.format == "PNG" and mask.size == (24, 16)
                drawn = np.asarray(mask.convert("L"))
            assert set(np.unique(drawn)) == {0, 255} and drawn[12, 4:20].all() and not drawn[:8].any()
            direct = httpx.post(f"{url}/v1/edit", headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                                data={"operation": "inpaint", "class": label, "cfg": "2", "temperature": "1",
                                      "seed": "1234"},
                                files={"image": ("upload.png", upload.read_bytes(), "image/png"),
                                       "mask": ("mask.png", mask_png, "image/png")})
            # the page sent that mask and these options: the server's answer to them is what it shows
            assert direct.status_code == 200 and (_shown_pixels(page, "#edited") == _pixels(direct.content)).all()
            assert page.is_hidden("#edit-error")

            screenshot = tmp_path / "serve_page.png"
            page.screenshot(path=str(screenshot), full_page=True)
            print(f"screenshot: {screenshot}")
            assert not js_errors, js_errors
        finally:
            browser.close()

"""A loopback web for `vqgan data collect`, offline: an image server and a forward HTTP proxy.

    with ImageServer(images=50) as server, ForwardProxy() as proxy:
        entries = server.plan(shard_size=20)   # 50 good images, each bad kind once, a slow URL per 20
        expected = write_url_list(entries, tmp / "urls.csv")
        collect(CollectConfig(url_list=..., proxy=proxy.url, ...))
        server.count(entries[0].path), proxy.urls   # who asked for what

Both bind 127.0.0.1 on a free port and answer each request in its own thread. The server's images
are smooth gradients with blurred shapes, generated from a seed and kept only when their
perceptual hash is more than `min_distance` bits from every earlier one, so a collection removes
exactly the near duplicates planted on purpose. Paths, one per kind of response:

    /image/I.png      good image I (0 <= I < images)
    /missing/J.png    404
    /slow/J.png       an image, after `slow_seconds` (longer than a client's timeout)
    /html/J.jpg       an HTML page sent as image/jpeg
    /truncated/J.png  the first half of a PNG
    /redirect/J.png   302 to /target/J.png, a further image not otherwise listed
    /noai/J.png       an image with `X-Robots-Tag: noai`
    /near/J.jpg       image J at 3/4 size, JPEG quality 70: a near duplicate of /image/J.png
"""
from __future__ import annotations

import csv
import http.client
import io
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence, TypeVar
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

BAD_KINDS = ("missing", "slow", "html", "truncated", "redirect", "noai", "near")
CLASS_NAMES = ("alpha", "beta", "gamma")  # labels of the csv / parquet URL lists, by position
USER_AGENT_TOKEN = "vqgan-toolkit"
# unset them all for a run whose only proxy is the one it names: urllib reads every spelling, and
# NO_PROXY would send requests for 127.0.0.1 past the proxy
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy")
# headers that describe one connection, not the resource: a proxy must not pass them on (RFC 9110 7.6.1)
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate",
              "te", "trailer", "transfer-encoding", "upgrade"}


# ---- images ---------------------------------------------------------------------------------

def draw_image(seed: int, candidate: int, size: int) -> Image.Image:
    """A smooth RGB image: a two-colour linear gradient under three blurred shapes, all from the seed."""
    rng = np.random.default_rng([seed, candidate])
    c0, c1 = rng.integers(0, 256, (2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    t = (xs - 0.5) * np.cos(angle) + (ys - 0.5) * np.sin(angle)
    t = (t - t.min()) / (t.max() - t.min())  # (size, size) in [0, 1]
    pixels = c0 * (1 - t[..., None]) + c1 * t[..., None]  # (size, size, 3)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        w, h = rng.uniform(0.25, 0.6, 2) * size
        x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = rng.integers(3)
        if shape == 0:
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        elif shape == 1:
            draw.rectangle((x, y, x + w, y + h), fill=colour)
        else:
            draw.polygon([(x, y + h), (x + w / 2, y), (x + w, y + h)], fill=colour)
    # blur: the perceptual hash then survives the resizing and re-encoding of a near-duplicate copy
    return image.filter(ImageFilter.GaussianBlur(size / 40))


def encode(image: Image.Image, fmt: str, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def near_copy(image: Image.Image) -> Image.Image:
    """The planted near duplicate: 3/4 the size (48 px for 64)."""
    side = round(image.width * 3 / 4)
    return image.resize((side, side), Image.Resampling.LANCZOS)


class DistinctImages:
    """The greedy sequence of generated images whose phash is more than `min_distance` bits from
    every earlier one's (and whose near copy stays within 2 bits of its own). Item i does not
    depend on how many items were asked for, so servers with more images share a prefix."""

    def __init__(self, seed: int = 0, size: int = 64, min_distance: int = 10) -> None:
        self.seed, self.size, self.min_distance = seed, size, min_distance
        self.images: list[Image.Image] = []
        self.hashes: list[Any] = []
        self._candidate = 0
        self._lock = threading.Lock()

    def __getitem__(self, index: int) -> Image.Image:
        import imagehash

        with self._lock:
            while len(self.images) <= index:
                image = draw_image(self.seed, self._candidate, self.size)
                self._candidate += 1
                phash = imagehash.phash(image)
                copy = Image.open(io.BytesIO(encode(near_copy(image), "JPEG", 70)))
                if phash - imagehash.phash(copy) > 2:
                    continue
                if all(phash - other > self.min_distance for other in self.hashes):
                    self.images.append(image)
                    self.hashes.append(phash)
            return self.images[index]


# ---- the URL list ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One URL of a list: its kind (`image` or one of BAD_KINDS), label and caption."""

    url: str
    kind: str
    index: int
    label: str
    caption: str
    redirect_to: str | None = None

    @property
    def path(self) -> str:
        return urlsplit(self.url).path


def expected_report(entries: Sequence[Entry], allow_opted_out: bool = False) -> dict[str, Any]:
    """The counts `vqgan data collect` should report for these entries (report.json without `shards`;
    zero counts are left out of `failed`)."""
    kinds = Counter(e.kind for e in entries)
    opted_out = 0 if allow_opted_out else kinds["noai"]
    downloaded = kinds["image"] + kinds["redirect"] + kinds["near"] + kinds["noai"] - opted_out
    failed = {"http_404": kinds["missing"], "timeout": kinds["slow"],
              "undecodable": kinds["html"] + kinds["truncated"]}
    near = kinds["near"]  # each a copy of a listed good image, none of the same bytes
    return {"urls": len(entries), "downloaded": downloaded, "failed": {k: v for k, v in failed.items() if v},
            "opted_out": opted_out, "filtered": {"min_size": 0, "aspect_ratio": 0},
            "duplicates": {"exact": 0, "near": near}, "kept": downloaded - near}


def write_url_list(entries: Sequence[Entry], path: Path) -> dict[str, Any]:
    """Write the URLs as .txt (one per line), .csv / .tsv or .parquet (columns url, label, caption);
    returns `expected_report(entries)`."""
    path = Path(path)
    rows = [{"url": e.url, "label": e.label, "caption": e.caption} for e in entries]
    if path.suffix == ".txt":
        path.write_text("".join(f"{e.url}\n" for e in entries), encoding="utf-8")
    elif path.suffix in (".csv", ".tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["url", "label", "caption"],
                                    delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(f"write_url_list: {path.suffix!r} is not .txt, .csv, .tsv or .parquet")
    return expected_report(entries)


# ---- the image server -----------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    path: str
    user_agent: str
    time: float


class _ImageHandler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: tests read the request log
        pass

    def _send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        owner: ImageServer = self.server.owner
        owner._record(self.path, self.headers.get("User-Agent", ""))
        kind, _, name = urlsplit(self.path).path.strip("/").partition("/")
        try:
            index = int(name.split(".")[0])
        except ValueError:
            return self._send(404, b"not found", "text/plain")
        if kind == "image" and 0 <= index < owner.num_images:
            self._send(200, owner.image_bytes(index), owner.content_type)
        elif kind == "slow":
            if owner.stopping.wait(owner.slow_seconds):
                return  # the server is stopping: drop the connection
            self._send(200, owner.image_bytes(owner.extra_index("slow", index)), owner.content_type)
        elif kind == "html":
            self._send(200, b"<!doctype html><html><body><p>not an image</p></body></html>", "image/jpeg")
        elif kind == "truncated":
            data = encode(owner.images[owner.extra_index("truncated", index)], "PNG")
            self._send(200, data[: len(data) // 2], "image/png")
        elif kind == "redirect":
            self._send(302, b"", "text/plain", Location=f"{owner.url}/target/{index}.png")
        elif kind == "target":
            self._send(200, owner.image_bytes(owner.extra_index("redirect", index)), owner.content_type)
        elif kind == "noai":
            self._send(200, owner.image_bytes(owner.extra_index("noai", index)), owner.content_type,
                       X_Robots_Tag="noai")
        elif kind == "near" and 0 <= index < owner.num_images:
            self._send(200, encode(near_copy(owner.images[index]), "JPEG", 70), "image/jpeg")
        else:
            self._send(404, b"not found", "text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow response must not hold up stop()
    # socketserver's default backlog of 5 drops the SYNs of a burst of connections; the client's
    # retransmission waits 1 s, as long as a test's timeout, and the URL would fail as a timeout
    request_queue_size = 256
    owner: Any

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out reset their connections: expected here, not worth a traceback


B = TypeVar("B", bound="_Background")


class _Background:
    """Runs an HTTP server on 127.0.0.1 (port 0: a free one) in a thread; a context manager."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._handler = handler
        self._httpd: _Server | None = None
        self.stopping = threading.Event()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self: B) -> B:
        self.stopping.clear()
        self._httpd = _Server(("127.0.0.1", 0), self._handler)
        self._httpd.owner = self
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self.stopping.set()
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self: B) -> B:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class ImageServer(_Background):
    """Serves `images` distinct generated images (`size` px, PNG or JPEG) and the bad responses of
    BAD_KINDS; records every request (path with query, User-Agent) thread-safely."""

    def __init__(self, images: int = 50, seed: int = 0, size: int = 64, image_format: str = "png",
                 slow_seconds: float = 3.0, min_distance: int = 10) -> None:
        super().__init__(_ImageHandler)
        if image_format not in ("png", "jpeg"):
            raise ValueError(f"image_format must be png or jpeg, got {image_format!r}")
        self.num_images, self.slow_seconds = images, slow_seconds
        self.images = DistinctImages(seed, size, min_distance)
        self._format = image_format.upper()
        self.content_type = f"image/{image_format}"
        self._encoded: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self.requests: list[Request] = []

    def extra_index(self, kind: str, index: int) -> int:
        """The generated image behind bad kind `kind`'s J-th URL: after the good images, never one of them."""
        return self.num_images + BAD_KINDS.index(kind) + len(BAD_KINDS) * index

    def image_bytes(self, index: int) -> bytes:
        with self._lock:
            data = self._encoded.get(index)
        if data is None:
            data = encode(self.images[index], self._format)
            with self._lock:
                self._encoded[index] = data
        return data

    def prepare(self, extra_per_kind: int = 1) -> None:
        """Generate and encode every image up front, so that the first requests are not slower."""
        for index in range(self.num_images):
            self.image_bytes(index)
        self.images[self.extra_index(BAD_KINDS[-1], extra_per_kind - 1)]

    def _record(self, path: str, user_agent: str) -> None:
        with self._lock:
            self.requests.append(Request(path, user_agent, time.monotonic()))

    def counts(self) -> Counter[str]:
        """Requests so far per path (with query)."""
        with self._lock:
            return Counter(r.path for r in self.requests)

    def count(self, path: str) -> int:
        return self.counts()[path]

    def user_agents(self) -> set[str]:
        with self._lock:
            return {r.user_agent for r in self.requests}

    def entry(self, kind: str, index: int) -> Entry:
        """The URL of the `index`-th response of `kind` (`image` or one of BAD_KINDS)."""
        suffix = "jpg" if kind in ("html", "near") else "png"
        label = CLASS_NAMES[index % len(CLASS_NAMES)]
        url = f"{self.url}/{kind}/{index}.{suffix}"
        return Entry(url, kind, index, label, f"{kind} {index}",
                     redirect_to=f"{self.url}/target/{index}.png" if kind == "redirect" else None)

    def plan(self, good: int | None = None, bad: Sequence[str] = BAD_KINDS, shard_size: int | None = None
             ) -> list[Entry]:
        """Good images 0..good-1 (all by default) with one URL of each kind in `bad` spread evenly
        among them. With `shard_size`, the slow URLs instead go one into each block of `shard_size`
        URLs, so that every raw shard of that size waits for a timeout once."""
        good = self.num_images if good is None else good
        others = [k for k in bad if not (shard_size and k == "slow")]
        items = [self.entry("image", i) for i in range(good)]
        for n, kind in enumerate(others):  # bad URL n after ~ (n + 0.5) / len(others) of the good ones
            items.insert(round((n + 0.5) * len(items) / len(others)), self.entry(kind, 0))
        if not shard_size or "slow" not in bad:
            return items
        step = shard_size - 1
        planned: list[Entry] = []
        for block, start in enumerate(range(0, len(items), step)):
            chunk = items[start:start + step]
            planned += chunk[: len(chunk) // 2] + [self.entry("slow", block)] + chunk[len(chunk) // 2:]
        return planned


# ---- the forward proxy ----------------------------------------------------------------------

class _ProxyHandler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        owner: ForwardProxy = self.server.owner
        target = urlsplit(self.path)
        if target.scheme != "http" or not target.hostname:
            return self.send_error(400, "a forward proxy wants absolute-form http:// URLs")
        owner._record(self.path)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = target.netloc
        path = target.path or "/"
        if target.query:
            path += f"?{target.query}"
        connection = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=owner.upstream_timeout)
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()  # redirects are the client's business: passed on as they are
            status, reason, body = response.status, response.reason, response.read()
            upstream = response.getheaders()
        except TimeoutError:
            return self.send_error(504, "upstream timed out")
        except OSError as e:
            return self.send_error(502, f"upstream unreachable: {e}")
        finally:
            connection.close()
        try:
            self.send_response(status, reason)
            for name, value in upstream:
                if name.lower() not in HOP_BY_HOP | {"content-length", "server", "date"}:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (its timeout is shorter than a slow upstream)

    def do_CONNECT(self) -> None:  # noqa: N802 - no TLS tunnels: the loopback web is plain http
        self.send_error(501, "CONNECT is not supported")


class ForwardProxy(_Background):
    """A forward HTTP proxy for absolute-form GETs, passing status, headers and body through (it does
    not follow redirects); records every requested URL. Anything but GET gets 501."""

    def __init__(self, upstream_timeout: float = 30.0) -> None:
        super().__init__(_ProxyHandler)
        self.upstream_timeout = upstream_timeout
        self._lock = threading.Lock()
        self.urls: list[str] = []

    def _record(self, url: str) -> None:
        with self._lock:
            self.urls.append(url)

    def seen(self) -> Counter[str]:
        with self._lock:
            return Counter(self.urls)


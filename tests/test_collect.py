"""`vqgan data collect` against a loopback web (benchmarks/loopback_web.py): every outcome of a URL is
counted under its reason, every request goes through the proxy, a killed collection resumes to the
same shards, bad input stops before the first request, and the shards train a tokenizer."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("img2dataset", reason="vqgan data collect downloads with img2dataset (pip install img2dataset)")
pytest.importorskip("imagehash", reason="vqgan data collect finds near duplicates with imagehash")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # benchmarks/ is not an installed package; its loopback web is shared with them
    sys.path.insert(0, str(REPO))

from benchmarks.loopback_web import (  # noqa: E402
    PROXY_VARIABLES, USER_AGENT_TOKEN, Entry, ForwardProxy, ImageServer, write_url_list)
from data.collect import CollectConfig, collect  # noqa: E402
from data.errors import DataSourceError  # noqa: E402

SHARD_SIZE = 20
# the client's timeout is 1 s and the slow response takes 3 s: a clear timeout, and one per raw shard
# (plan(shard_size=...)) keeps every shard busy for a second, long enough to kill a run between shards
SETTINGS = dict(processes=1, threads=8, timeout=1.0, retries=0, image_size=32, shard_size=SHARD_SIZE,
                label_col="label", caption_col="caption")
CLI_SETTINGS = ["--processes", "1", "--threads", "8", "--timeout", "1", "--retries", "0", "--image-size", "32",
                "--shard-size", str(SHARD_SIZE), "--label-col", "label", "--caption-col", "caption", "--quiet"]


@dataclass
class Web:
    server: ImageServer
    proxy: ForwardProxy


@dataclass
class Collected:
    entries: list[Entry]
    expected: dict[str, Any]
    urls: Path           # the csv
    out: Path
    report: dict[str, Any]
    requests: Counter[str]  # the server's requests per path and the proxy's per URL, right after the run
    proxied: Counter[str]


@pytest.fixture(scope="module")
def web() -> Iterator[Web]:
    """The loopback server and proxy, with no proxy variable in the environment: only --proxy routes
    requests, and NO_PROXY cannot bypass the proxy for 127.0.0.1."""
    with pytest.MonkeyPatch.context() as mp:
        for name in PROXY_VARIABLES:
            mp.delenv(name, raising=False)
        with ImageServer(images=50, slow_seconds=3.0) as server, ForwardProxy(upstream_timeout=30) as proxy:
            server.prepare(extra_per_kind=3)
            yield Web(server, proxy)


@pytest.fixture(scope="module")
def collected(web: Web, tmp_path_factory) -> Collected:
    """50 good images and one URL of every bad kind (a slow one per raw shard), collected through the proxy."""
    root = tmp_path_factory.mktemp("collect")
    entries = web.server.plan(shard_size=SHARD_SIZE)
    urls = root / "urls.csv"
    expected = write_url_list(entries, urls)
    out = root / "out"
    report = collect(CollectConfig(url_list=str(urls), out_dir=str(out), proxy=web.proxy.url, **SETTINGS),
                     progress=False)
    return Collected(entries, expected, urls, out, report, web.server.counts(), web.proxy.seen())


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of a webdataset tar."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


def kept_samples(out: Path) -> dict[str, dict[str, bytes]]:
    manifest = json.loads((out / "manifest.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        samples.update(read_shard(out / shard["name"]))
    return samples


def without_shards(report: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in report.items() if k != "shards"},
            "failed": {k: v for k, v in report["failed"].items() if v}}


@pytest.mark.slow
def test_collect_counts_every_outcome_through_the_proxy(collected: Collected, web: Web):
    report, out = collected.report, collected.out
    assert without_shards(report) == collected.expected
    assert json.loads((out / "report.json").read_text()) == report

    # every URL of the list went through the proxy, and so did the redirect's target
    wanted = {e.url for e in collected.entries} | {e.redirect_to for e in collected.entries if e.redirect_to}
    assert wanted <= set(collected.proxied)
    assert all(USER_AGENT_TOKEN in agent for agent in web.server.user_agents())
    slow = [e for e in collected.entries if e.kind == "slow"]
    assert [collected.requests[e.path] for e in slow] == [1] * len(slow)  # --retries 0

    # the manifest describes the shards as they are
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "vqgan-webdataset"
    assert [s["name"] for s in manifest["shards"]] == report["shards"]
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["shards"]:
        contents = read_shard(out / shard["name"])
        assert shard["count"] == len(contents) <= SHARD_SIZE
        samples.update(contents)
    assert manifest["count"] == len(samples) == report["kept"]

    # the near duplicate is gone and the earlier of the pair kept; labels and captions follow their URL
    by_url = {e.url: e for e in collected.entries}
    position = {e.url: i for i, e in enumerate(collected.entries)}
    records = {key: json.loads(sample["json"]) for key, sample in samples.items()}
    kept_urls = {r["url"] for r in records.values()}
    near = next(e for e in collected.entries if e.kind == "near")
    original = next(e for e in collected.entries if e.kind == "image" and e.index == near.index)
    first, later = sorted([original, near], key=lambda e: position[e.url])
    assert first.url in kept_urls and later.url not in kept_urls
    assert not kept_urls & {e.url for e in collected.entries if e.kind in ("noai", "slow", "missing", "html",
                                                                            "truncated")}
    assert len({r["sha256"] for r in records.values()}) == len(records)
    assert sorted(manifest["class_names"]) == sorted({e.label for e in collected.entries})
    for key, sample in samples.items():
        record, entry = records[key], by_url[records[key]["url"]]
        assert {"url", "key", "sha256", "phash", "original_width", "original_height", "label",
                "caption"} <= record.keys()
        assert record["key"] == key and "jpg" in sample
        assert manifest["class_names"][int(sample["cls"])] == entry.label
        assert sample["txt"].decode() == entry.caption == record["caption"]
        assert (record["original_width"], record["original_height"]) == ((48, 48) if entry.kind == "near"
                                                                         else (64, 64))


@pytest.mark.slow
def test_collected_shards_train_a_tokenizer(collected: Collected, tmp_path):
    from vqgan.cli import main

    last = len(collected.report["shards"]) - 1
    spec = f"wds:{collected.out}/shard-{{000000..{last:06d}}}.tar"
    code = main(["train-tokenizer", "--config", str(REPO / "configs/tiny.yaml"), "model.resolution=16",
                 "model.ch=16", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[]",
                 "model.z_channels=8", "model.norm_groups=8", "model.quantizer.codebook_size=16",
                 "model.quantizer.code_dim=4", "loss.perceptual_weight=0", "loss.disc_start=100",
                 "loss.disc_channels=8", "loss.disc_layers=1", f"data.source={spec}", "train.steps=2",
                 "train.batch_size=8", "train.eval_images=8", "train.checkpoint_every=100",
                 "train.image_every=100", "train.log_every=1", "train.mixed_precision=no",
                 f"train.out_dir={tmp_path / 'run'}"])
    assert code == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert (tmp_path / "run" / "tokenizer" / "model.safetensors").is_file()


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_killed_collection_resumes_to_the_same_shards(collected: Collected, web: Web, tmp_path):
    """SIGKILL a real `vqgan data collect` (and its img2dataset processes) once its first raw shard is
    done; the same command then downloads only the unfinished shards and ends with an uninterrupted
    run's shards (the `collected` fixture, same URL list and settings)."""
    out = tmp_path / "killed"
    args = ["data", "collect", str(collected.urls), "--out", str(out), "--proxy", web.proxy.url, *CLI_SETTINGS]
    proc = subprocess.Popen([sys.executable, "-m", "vqgan", *args], cwd=REPO, env=_subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "raw" / "00000_stats.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first raw shard did not finish in 120 s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, img2dataset's process and its pool: one session
        proc.wait()
        proc.stderr.close()
    finished = sorted(int(p.name.split("_")[0]) for p in (out / "raw").glob("*_stats.json"))
    num_raw = -(-len(collected.entries) // SHARD_SIZE)
    assert len(finished) < num_raw, "the run was over before the kill: give each raw shard more to wait for"
    assert not (out / "manifest.json").exists()
    before = web.server.counts()

    from vqgan.cli import main

    assert main(args) == 0  # the same command, to completion

    after = web.server.counts()
    for shard in range(num_raw):
        for entry in collected.entries[shard * SHARD_SIZE:(shard + 1) * SHARD_SIZE]:
            if shard in finished:
                assert after[entry.path] == before[entry.path], f"{entry.url} of finished raw shard {shard}"
            else:
                assert after[entry.path] > before[entry.path], f"{entry.url} of unfinished raw shard {shard}"
    report = json.loads((out / "report.json").read_text())
    assert report == collected.report
    reference = json.loads((collected.out / "manifest.json").read_text())
    assert json.loads((out / "manifest.json").read_text())["shards"] == reference["shards"]  # byte-identical tars
    keys_and_hashes = {k: json.loads(s["json"])["sha256"] for k, s in kept_samples(out).items()}
    assert keys_and_hashes == {k: json.loads(s["json"])["sha256"] for k, s in kept_samples(collected.out).items()}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_bad_input_stops_before_any_request(web: Web, tmp_path, capsys):
    from vqgan.cli import main

    good = tmp_path / "good.csv"
    write_url_list([web.server.entry("image", i) for i in range(3)], good)
    no_url_column = tmp_path / "links.csv"
    no_url_column.write_text(f"link,label\n{web.server.entry('image', 0).url},alpha\n")
    directory = tmp_path / "folder.csv"
    directory.mkdir()
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not a parquet file")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("someone else's file")
    closed = f"http://127.0.0.1:{_closed_port()}"

    cases = [  # (URL file, out dir, extra flags, what the message must say)
        (tmp_path / "missing.csv", tmp_path / "o1", [], ["missing.csv", "does not exist"]),
        (directory, tmp_path / "o2", [], ["folder.csv", "is a directory"]),
        (garbage, tmp_path / "o3", [], ["garbage.parquet", "parquet"]),
        (no_url_column, tmp_path / "o4", [], ["'url'", "link, label"]),
        (good, tmp_path / "o5", ["--proxy", closed], [closed, "unreachable"]),
        (good, busy, [], ["busy", "other files", "notes.txt"]),
    ]
    requests, proxied = len(web.server.requests), len(web.proxy.urls)
    for urls, out, flags, phrases in cases:
        code = main(["data", "collect", str(urls), "--out", str(out), "--quiet", *flags])
        err = capsys.readouterr().err
        assert code == 2, (urls, err)
        assert err.startswith("vqgan data: error: "), err
        for phrase in phrases:
            assert phrase in err, (phrase, err)
        if out != busy:
            assert not out.exists(), f"{out} was created for bad input"
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]

    # the Python API raises the same errors
    with pytest.raises(DataSourceError, match="has no column 'url'"):
        collect(CollectConfig(url_list=str(no_url_column), out_dir=str(tmp_path / "api1")), progress=False)
    with pytest.raises(DataSourceError, match="unreachable"):
        collect(CollectConfig(url_list=str(good), out_dir=str(tmp_path / "api2"), proxy=closed), progress=False)
    assert (len(web.server.requests), len(web.proxy.urls)) == (requests, proxied), "bad input made a request"


def test_loopback_web_serves_what_the_counts_assume(web: Web):
    """The fixture itself: distinct images, and a proxy that passes responses through unchanged."""
    import http.client
    import itertools

    hashes = web.server.images.hashes[:web.server.num_images]
    assert min(a - b for a, b in itertools.combinations(hashes, 2)) > 10

    host, port = "127.0.0.1", int(web.proxy.url.rsplit(":", 1)[1])

    def through_proxy(method: str, url: str) -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection(host, port, timeout=10)
        connection.request(method, url)
        response = connection.getresponse()
        response.read()
        connection.close()
        return response

    redirect = web.server.entry("redirect", 0)
    response = through_proxy("GET", redirect.url)
    assert (response.status, response.getheader("Location")) == (302, redirect.redirect_to)  # not followed
    assert through_proxy("GET", web.server.entry("noai", 0).url).getheader("X-Robots-Tag") == "noai"
    assert through_proxy("GET", web.server.entry("missing", 0).url).status == 404
    assert through_proxy("CONNECT", f"127.0.0.1:{port}").status == 501


@pytest.mark.parametrize("suffix", [".txt", ".csv", ".tsv", ".parquet"])
def test_url_lists_of_every_format_are_read(web: Web, tmp_path, suffix: str):
    from data.collect import read_url_table

    entries = web.server.plan(good=5, bad=("missing", "near"))
    path = tmp_path / f"urls{suffix}"
    write_url_list(entries, path)
    labelled = {} if suffix == ".txt" else {"label_col": "label", "caption_col": "caption"}
    table, _ = read_url_table(CollectConfig(url_list=str(path), out_dir=str(tmp_path / "out"), **labelled))
    assert table.column("url").to_pylist() == [e.url for e in entries]
    if labelled:
        assert table.column("label").to_pylist() == [e.label for e in entries]
        assert table.column("caption").to_pylist() == [e.caption for e in entries]

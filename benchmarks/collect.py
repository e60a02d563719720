"""Images/s of `vqgan data collect` from a loopback image server, with and without a forward proxy.

    OMP_NUM_THREADS=1 python benchmarks/collect.py [--images 400] [--size 256] [--processes 1 4] \
        [--threads 16] [--shard-size 100]

Serves `--images` distinct generated JPEGs (`--size` px, quality 95) from benchmarks/loopback_web.py
on 127.0.0.1 and collects them at the same size with each process count, once straight and once
through the loopback proxy. "download" is img2dataset's own phase, from the first raw shard's start
to the last one's end (their `_stats.json`); "end to end" is the whole `collect` call: img2dataset's
process start-up (three Python processes importing it), the download, the de-duplication and the
final shards. Server and proxy are threads of this one Python process, so at high rates they, not
the downloader, may be the limit; the machine's other load moves every number.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine_header  # noqa: E402
from benchmarks.loopback_web import PROXY_VARIABLES, ForwardProxy, ImageServer, write_url_list  # noqa: E402

from data.collect import CollectConfig, collect  # noqa: E402


def download_seconds(raw_dir: Path) -> float:
    """First raw shard's start to last raw shard's end, from img2dataset's stats files."""
    stats = [json.loads(p.read_text()) for p in raw_dir.glob("*_stats.json")]
    return max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)


def run_once(urls: Path, out: Path, proxy: str | None, processes: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = CollectConfig(url_list=str(urls), out_dir=str(out), proxy=proxy, processes=processes,
                        threads=args.threads, timeout=10.0, retries=0, image_size=args.size,
                        shard_size=args.shard_size)
    start = time.perf_counter()
    report = collect(cfg, progress=False)
    total = time.perf_counter() - start
    return {"report": report, "download_s": download_seconds(out / "raw"), "total_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=256, help="served and stored image size in pixels")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=16, help="download threads per process")
    parser.add_argument("--shard-size", type=int, default=100, help="URLs per raw shard: 4 shards feed 4 processes")
    args = parser.parse_args()
    for name in PROXY_VARIABLES:  # only the proxy this benchmark names may route requests
        os.environ.pop(name, None)
    print(machine_header())

    # more than 8 phash bits apart, so that no served image is dropped as a near duplicate of another
    with ImageServer(images=args.images, size=args.size, image_format="jpeg", min_distance=8) as server, \
            ForwardProxy() as proxy, tempfile.TemporaryDirectory(prefix="collect-bench-") as tmp:
        start = time.perf_counter()
        server.prepare()
        urls = Path(tmp) / "urls.txt"
        write_url_list(server.plan(bad=()), urls)
        print(f"serving {args.images} JPEGs ({args.size} px) from {server.url}, made in "
              f"{time.perf_counter() - start:.1f} s; {args.threads} threads per process, "
              f"raw shards of {args.shard_size}\n")
        print("| processes | proxy | images | download s | download img/s | end-to-end s | end-to-end img/s |")
        print("|-----------|-------|--------|------------|----------------|--------------|------------------|")
        for processes in args.processes:
            for use_proxy in (False, True):
                out = Path(tmp) / f"p{processes}-{'proxy' if use_proxy else 'direct'}"
                before = len(proxy.urls)
                result = run_once(urls, out, proxy.url if use_proxy else None, processes, args)
                kept, downloaded = result["report"]["kept"], result["report"]["downloaded"]
                assert (len(proxy.urls) > before) == use_proxy, "requests did not take the intended route"
                note = "" if kept == args.images else f"  ({args.images - kept} not kept: {result['report']})"
                print(f"| {processes:>9} | {'yes' if use_proxy else 'no':>5} | {kept:>6} | "
                      f"{result['download_s']:>10.2f} | {downloaded / result['download_s']:>14.0f} | "
                      f"{result['total_s']:>12.2f} | {kept / result['total_s']:>16.1f} |{note}", flush=True)
    print(f"\nload avg after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

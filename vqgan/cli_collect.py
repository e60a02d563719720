"""`vqgan data collect`: image URLs -> clean webdataset shards (see data/collect.py)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path


def _cmd_data_collect(args: argparse.Namespace) -> int:
    from data.collect import CollectConfig, collect, format_report

    cfg = CollectConfig(url_list=args.urls, out_dir=str(args.out), url_col=args.url_col, label_col=args.label_col,
                        caption_col=args.caption_col, proxy=args.proxy, processes=args.processes,
                        threads=args.threads, timeout=args.timeout, retries=args.retries,
                        image_size=args.image_size, resize_mode=args.resize_mode, image_format=args.image_format,
                        shard_size=args.shard_size, distributor=args.distributor,
                        allow_opted_out=args.allow_opted_out, min_size=args.min_size,
                        max_aspect_ratio=args.max_aspect_ratio, near_dup_distance=args.near_dup_distance,
                        user_agent_token=args.user_agent_token)
    report = collect(cfg, progress=not args.quiet)
    print(format_report(report))
    last = len(report["shards"]) - 1
    print(f"report: {Path(args.out) / 'report.json'}; read the images with the data spec "
          f"wds:{Path(args.out) / f'shard-{{000000..{last:06d}}}.tar'}")
    return 0


def add_collect_parser(data_sub: argparse._SubParsersAction) -> None:
    from data.collect import DISTRIBUTORS, IMAGE_FORMATS, RESIZE_MODES

    p = data_sub.add_parser(
        "collect", help="download image URLs (img2dataset) into clean webdataset shards",
        description="Download the images of a URL list with img2dataset (optionally through a proxy), skip "
                    "images whose headers opt out of AI training, remove exact and near duplicates, and write "
                    "webdataset shards with a manifest and a per-reason report. Rerun the same command to resume "
                    "an interrupted collection. Needs the collect extra: pip install -e \".[collect]\".",
        epilog="example: vqgan data collect urls.csv --out web/ --label-col label --proxy http://proxy:3128 "
               "--processes 4 --threads 64")
    p.add_argument("urls", help="URL list: .txt (one per line), .csv, .tsv or .parquet")
    p.add_argument("--out", required=True, type=Path, help="output directory (new, empty, or this collection's)")
    p.add_argument("--url-col", default="url", help="column of the URLs (csv/tsv/parquet)")
    p.add_argument("--label-col", default=None, help="column of class labels (integers or names)")
    p.add_argument("--caption-col", default=None, help="column of captions, stored as KEY.txt")
    p.add_argument("--proxy", default=None,
                   help="HTTP proxy for every request, http://HOST:PORT (default: HTTP_PROXY / HTTPS_PROXY)")
    p.add_argument("--processes", type=int, default=1, help="download processes")
    p.add_argument("--threads", type=int, default=32, help="download threads per process")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=1, help="retries of a failed request")
    p.add_argument("--image-size", type=int, default=256, help="stored image size in pixels")
    p.add_argument("--resize-mode", default="center_crop", choices=RESIZE_MODES, help="img2dataset's resize mode")
    p.add_argument("--image-format", default="jpg", choices=IMAGE_FORMATS)
    p.add_argument("--shard-size", type=int, default=1000, help="URLs per download shard and images per output shard")
    p.add_argument("--distributor", default="multiprocessing", choices=DISTRIBUTORS,
                   help="img2dataset's distributor (pyspark and ray for clusters)")
    p.add_argument("--allow-opted-out", action="store_true",
                   help="keep images whose X-Robots-Tag says noai/noimageai/noindex/noimageindex")
    p.add_argument("--min-size", type=int, default=0, help="drop images whose smaller side is below this")
    p.add_argument("--max-aspect-ratio", type=float, default=math.inf, help="drop images more elongated than this")
    p.add_argument("--near-dup-distance", type=int, default=4,
                   help="perceptual-hash bits within which images are near duplicates (-1: exact duplicates only)")
    p.add_argument("--user-agent-token", default="vqgan-toolkit", help="names this tool in the User-Agent")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_data_collect)

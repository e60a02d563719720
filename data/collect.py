"""`vqgan data collect`: a list of image URLs -> clean webdataset shards, downloaded by img2dataset.

    DIR/collect.json           the settings of this collection (a rerun must match them)
    DIR/raw/00000.tar ...      img2dataset's output: images, .parquet per-URL status, _stats.json
    DIR/logs/img2dataset.log   img2dataset's own output
    DIR/shard-000000.tar ...   the kept images after de-duplication (`wds:DIR/shard-{...}.tar`)
    DIR/manifest.json          counts, class names, sha256 per shard (as `vqgan data pack` writes)
    DIR/report.json            what happened to every URL, by reason

The download itself is img2dataset's (processes x threads, timeouts, retries, resizing,
`X-Robots-Tag` opt-outs, multiprocessing / pyspark / ray distributors); it runs in a child
process so that its own signal handling cannot end ours, with the proxy in the child's
environment (urllib reads `HTTP_PROXY` / `HTTPS_PROXY`). Its incremental mode skips raw shards
whose `_stats.json` exists, so a killed collection rerun with the same command downloads only
what is missing; the clean-up (`data.collect_clean`) is then redone over all raw shards in a
fixed order, so the result equals an uninterrupted run's. Every input is checked before the
first request: the URL file and its columns, the proxy, the output directory.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tqdm import tqdm

from common import atomic_write_json, sha256_file
from data.collect_clean import clean_collection, format_report
from data.errors import DataSourceError

INPUT_FORMATS = {".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
RESIZE_MODES = ("center_crop", "border", "keep_ratio", "keep_ratio_largest", "no")
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
IMAGE_FORMATS = ("jpg", "png", "webp")
OPT_OUT_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]  # img2dataset's default set
STATE_NAME, STATE_FORMAT = "collect.json", "vqgan-collect"
RAW_DIR, LOG_DIR = "raw", "logs"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
PROXY_CHECK_TIMEOUT_S = 5.0
# settings that change what is downloaded or how it is stored: a rerun must keep them
OUTPUT_SETTINGS = ("url_list_sha256", "url_col", "label_col", "caption_col", "image_size", "resize_mode",
                   "image_format", "shard_size", "min_size", "max_aspect_ratio", "allow_opted_out")


@dataclass
class CollectConfig:
    """Options of one collection; every field has the CLI flag of the same name."""

    url_list: str                         # .txt (a URL per line), .csv, .tsv or .parquet
    out_dir: str
    url_col: str = "url"
    label_col: str | None = None          # class per URL: integers, or names (sorted into class indices)
    caption_col: str | None = None
    proxy: str | None = None              # http://host:port; None: HTTP_PROXY / HTTPS_PROXY if set
    processes: int = 1
    threads: int = 32
    timeout: float = 10.0                 # seconds per request
    retries: int = 1
    image_size: int = 256
    resize_mode: str = "center_crop"
    image_format: str = "jpg"
    shard_size: int = 1000                # URLs per raw shard, and images per final shard
    distributor: str = "multiprocessing"
    allow_opted_out: bool = False         # keep images whose headers opt out of AI training
    min_size: int = 0                     # pixels, the smaller side of the original image
    max_aspect_ratio: float = math.inf
    near_dup_distance: int = 4            # perceptual-hash bits; -1 keeps near duplicates
    user_agent_token: str = "vqgan-toolkit"
    extra_env: dict[str, str] = field(default_factory=dict)  # more environment for img2dataset's process

    def validate(self) -> None:
        def positive(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise DataSourceError(f"collect: --{name.replace('_', '-')} must be positive, got {value!r}")

        for name in ("processes", "threads", "image_size", "shard_size", "timeout", "max_aspect_ratio"):
            positive(name, getattr(self, name))
        if self.retries < 0 or self.min_size < 0:
            raise DataSourceError("collect: --retries and --min-size must be >= 0")
        if self.near_dup_distance < -1 or self.near_dup_distance > 32:
            raise DataSourceError(f"collect: --near-dup-distance must be in -1..32, got {self.near_dup_distance}")
        for name, value, allowed in (("resize_mode", self.resize_mode, RESIZE_MODES),
                                     ("distributor", self.distributor, DISTRIBUTORS),
                                     ("image_format", self.image_format, IMAGE_FORMATS)):
            if value not in allowed:
                raise DataSourceError(f"collect: --{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                      f"got {value!r}")
        if not self.user_agent_token.strip():
            raise DataSourceError("collect: --user-agent-token must not be empty")


# ---- checks before any request --------------------------------------------------------------

def read_url_table(cfg: CollectConfig):
    """The URL file as a pyarrow table (url, label and caption columns), read the way img2dataset
    reads it; raises DataSourceError naming the file and what is wrong."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    path = Path(cfg.url_list).expanduser()
    input_format = INPUT_FORMATS.get(path.suffix.lower())
    if input_format is None:
        raise DataSourceError(f"collect: URL file {str(path)!r} must end in one of {', '.join(INPUT_FORMATS)}")
    if not path.is_file():
        raise DataSourceError(f"collect: URL file {str(path)!r} "
                              f"{'is a directory' if path.is_dir() else 'does not exist'}")
    wanted = [c for c in (cfg.url_col, cfg.label_col, cfg.caption_col) if c]
    try:
        if input_format == "txt":
            table = pa_csv.read_csv(path, read_options=pa_csv.ReadOptions(column_names=["url"]))
        elif input_format == "parquet":
            table = pq.read_table(path)
        else:
            delimiter = "\t" if input_format == "tsv" else ","
            table = pa_csv.read_csv(path, parse_options=pa_csv.ParseOptions(delimiter=delimiter))
    except (OSError, pa.ArrowException, ValueError) as e:
        raise DataSourceError(f"collect: URL file {str(path)!r} cannot be read as {input_format}: {e}") from e
    if input_format == "txt" and wanted != ["url"]:
        raise DataSourceError(f"collect: URL file {str(path)!r} is plain text (one URL per line); "
                              f"labels and captions need a .csv, .tsv or .parquet file")
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise DataSourceError(f"collect: URL file {str(path)!r} has no column {missing[0]!r} "
                              f"(columns: {', '.join(table.column_names)}); name it with "
                              f"--{'url' if missing[0] == cfg.url_col else 'label' if missing[0] == cfg.label_col else 'caption'}-col")
    if table.num_rows == 0:
        raise DataSourceError(f"collect: URL file {str(path)!r} holds no URLs")
    return table.select(wanted), input_format


def class_names_of(labels: list) -> list[str] | None:
    """Class names from a label column: integers 0..max keep their value as index; anything else is
    sorted by name. Missing labels (None, NaN, '') are unlabelled."""
    present = [v for v in labels if v is not None and v == v and v != ""]
    if not present:
        return None
    if all(isinstance(v, int) or (isinstance(v, float) and v.is_integer()) for v in present):
        if min(present) < 0:
            raise DataSourceError(f"collect: integer labels must be >= 0, found {min(present)}")
        return [str(i) for i in range(int(max(present)) + 1)]
    return sorted({str(v) for v in present})


def proxies_in_effect(cfg: CollectConfig) -> list[str]:
    if cfg.proxy:
        return [cfg.proxy]
    return sorted({os.environ[v] for v in PROXY_VARIABLES if os.environ.get(v)})


def check_proxy(url: str) -> None:
    """Raise DataSourceError unless a TCP connection to the proxy opens."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DataSourceError(f"collect: proxy {url!r} is not an http://HOST:PORT URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=PROXY_CHECK_TIMEOUT_S).close()
    except OSError as e:
        raise DataSourceError(f"collect: proxy {url!r} is unreachable ({e}); check --proxy, HTTP_PROXY "
                              f"and HTTPS_PROXY") from e


def check_out_dir(out: Path, settings: dict[str, Any]) -> None:
    """A new or empty directory, or one holding a collection made with the same settings."""
    if out.exists() and not out.is_dir():
        raise DataSourceError(f"collect: --out {str(out)!r} is a file, not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    state_path = out / STATE_NAME
    if not state_path.is_file():
        found = sorted(p.name for p in out.iterdir())
        raise DataSourceError(f"collect: --out {str(out)!r} holds other files ({', '.join(found[:3])}"
                              f"{', ...' if len(found) > 3 else ''}); use an empty or new directory")
    try:
        previous = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataSourceError(f"collect: {str(state_path)!r} cannot be read: {e}") from e
    if previous.get("format") != STATE_FORMAT:
        raise DataSourceError(f"collect: {str(state_path)!r} is not a {STATE_FORMAT} record")
    changed = [k for k in OUTPUT_SETTINGS if previous.get(k) != settings[k]]
    if changed:
        what = ", ".join(f"{k}={previous.get(k)!r}, now {settings[k]!r}" for k in changed)
        raise DataSourceError(f"collect: {str(out)!r} holds a collection made with other settings ({what}); "
                              f"rerun with the same ones to resume, or use another directory")


def _check_distributor(name: str) -> None:
    if name != "multiprocessing" and importlib.util.find_spec(name) is None:
        raise DataSourceError(f"collect: --distributor {name} needs the {name} package (pip install {name})")


def _check_img2dataset() -> None:
    if importlib.util.find_spec("img2dataset") is None:
        raise DataSourceError('collect: img2dataset is not installed; pip install -e ".[collect]"')


# ---- the download ---------------------------------------------------------------------------

def img2dataset_arguments(cfg: CollectConfig, raw_dir: Path, input_format: str) -> dict[str, Any]:
    """Keyword arguments of `img2dataset.download` for this collection."""
    return dict(
        url_list=str(Path(cfg.url_list).expanduser().resolve()), output_folder=str(raw_dir),
        input_format=input_format, url_col=cfg.url_col, caption_col=cfg.caption_col,
        save_additional_columns=[cfg.label_col] if cfg.label_col else None,
        output_format="webdataset", encode_format=cfg.image_format, encode_quality=95,
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=False,
        min_image_size=cfg.min_size, max_aspect_ratio=cfg.max_aspect_ratio,
        processes_count=cfg.processes, thread_count=cfg.threads, timeout=cfg.timeout, retries=cfg.retries,
        number_sample_per_shard=cfg.shard_size, distributor=cfg.distributor, incremental_mode="incremental",
        compute_hash="sha256", extract_exif=False, enable_wandb=False,
        user_agent_token=cfg.user_agent_token.strip(),
        disallowed_header_directives=[] if cfg.allow_opted_out else list(OPT_OUT_DIRECTIVES),
    )


# The child leads its own process group (img2dataset's workers and logger join it). When its parent
# dies it gets SIGTERM (PR_SET_PDEATHSIG) and takes the whole group down, so a killed collection
# leaves no downloader behind to race the rerun.
_CHILD = """
import ctypes, json, os, signal, sys
signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
try:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[2]):  # the parent died before prctl
    os.killpg(0, signal.SIGKILL)
from img2dataset import download
download(**json.loads(sys.argv[1]))
"""
PID_NAME = "img2dataset.pgid"


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_leftover(pid_path: Path) -> None:
    """Kill what is left of a previous run's img2dataset group (it would write the same raw shards)."""
    try:
        pgid = int(pid_path.read_text())
    except (OSError, ValueError):
        return
    _kill_group(pgid)
    pid_path.unlink(missing_ok=True)


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def done_raw_shards(raw_dir: Path) -> list[int]:
    """Raw shards img2dataset finished: those with a `_stats.json` (written after the tar and parquet);
    none when the directory does not exist yet."""
    return sorted(int(p.name.split("_")[0]) for p in raw_dir.glob("*_stats.json"))


def run_img2dataset(cfg: CollectConfig, raw_dir: Path, log_path: Path, input_format: str, num_shards: int,
                    progress: bool = True) -> None:
    """Run img2dataset in a child process until every raw shard is done; raise RuntimeError if not."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled", **cfg.extra_env}
    if cfg.proxy:
        env.update({v: cfg.proxy for v in PROXY_VARIABLES})
    arguments = img2dataset_arguments(cfg, raw_dir, input_format)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pid_path = log_path.parent / PID_NAME
    _kill_leftover(pid_path)
    bar = tqdm(total=num_shards, initial=len(done_raw_shards(raw_dir)),
               unit="shard", desc="download", disable=not progress)
    with open(log_path, "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} img2dataset {json.dumps(arguments)}\n".encode())
        log.flush()
        child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(arguments), str(os.getpid())], env=env,
                                 stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        pid_path.write_text(str(child.pid))
        previous_term = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():  # a plain `kill` cleans up like Ctrl-C
            signal.signal(signal.SIGTERM, _raise_exit)
        try:
            while child.poll() is None:
                time.sleep(0.2)
                done = len(done_raw_shards(raw_dir))
                if done > bar.n:
                    bar.update(done - bar.n)
        finally:
            # stops the download on an error or interrupt; after success, img2dataset's logger process,
            # which can outlive its leader
            _kill_group(child.pid)
            child.wait()
            pid_path.unlink(missing_ok=True)
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, previous_term)
            bar.close()
    done = done_raw_shards(raw_dir)
    if child.returncode != 0 or len(done) < num_shards:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"collect: img2dataset finished {len(done)} of {num_shards} shards "
                           f"(exit code {child.returncode}); rerun the same command to resume. "
                           f"The end of {log_path}:\n{tail}")


# ---- the whole collection -------------------------------------------------------------------

def collect(cfg: CollectConfig, progress: bool = True) -> dict[str, Any]:
    """Download, clean up and shard the URLs of `cfg.url_list`; returns the report (also written as
    DIR/report.json). Resumes a collection in the same directory made with the same settings."""
    cfg.validate()
    _check_img2dataset()
    table, input_format = read_url_table(cfg)
    class_names = class_names_of(table.column(cfg.label_col).to_pylist()) if cfg.label_col else None
    out = Path(cfg.out_dir).expanduser()
    settings = {"format": STATE_FORMAT, "version": 1, "url_list": str(Path(cfg.url_list).expanduser().resolve()),
                "url_list_sha256": sha256_file(Path(cfg.url_list).expanduser()), "urls": table.num_rows,
                **{k: v for k, v in asdict(cfg).items() if k in OUTPUT_SETTINGS}}
    check_out_dir(out, settings)
    for proxy in proxies_in_effect(cfg):
        check_proxy(proxy)
    _check_distributor(cfg.distributor)

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / STATE_NAME, settings)
    raw_dir, num_shards = out / RAW_DIR, math.ceil(table.num_rows / cfg.shard_size)
    if len(done_raw_shards(raw_dir)) < num_shards:
        run_img2dataset(cfg, raw_dir, out / LOG_DIR / "img2dataset.log", input_format, num_shards, progress)
    report = clean_collection(raw_dir, out, num_raw_shards=num_shards, class_names=class_names,
                              label_col=cfg.label_col, near_dup_distance=cfg.near_dup_distance,
                              shard_size=cfg.shard_size, source=f"collect:{settings['url_list']}",
                              progress=progress)
    atomic_write_json(out / "report.json", report)
    if report["urls"] != table.num_rows:  # every URL has a row in img2dataset's parquet files
        raise RuntimeError(f"collect: the raw shards account for {report['urls']} of {table.num_rows} URLs")
    if report["kept"] == 0:
        raise DataSourceError(f"collect: no image of {str(cfg.url_list)!r} was kept; see {out / 'report.json'}")
    return report


__all__ = ["CollectConfig", "collect", "format_report", "read_url_table", "check_proxy", "check_out_dir"]

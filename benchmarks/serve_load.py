"""Load test of `vqgan serve` on loopback: dynamic batching vs --max-batch 1, then streaming latency.

    python benchmarks/serve_load.py [--prior DIR --tokenizer DIR] [--clients 8] [--seconds 10]
        [--max-batch 16] [--max-wait-ms 10] [--queue 64] [--threads 1] [--streams 5]

For each configuration a live server is started with the console script (`python -m vqgan serve`
on 127.0.0.1, a free port) and warmed up; then `--clients` threads each send POST /v1/generate
(n = 1, a random class and seed) back to back for `--seconds` and the server is stopped. Printed:
requests/s, images/s, p50/p95 latency, how many requests the server merged per sampling call, and
the outcome of every request: a PNG, an explicit 503 (the client pauses 10 ms and goes on) or lost
(a transport error, a timeout or any other status); lost must be 0. Last, `--streams` sequential
streaming requests on the idle batching server give the time to the first partial image and to the
full one (server-side, from the final event; and the client's time to the first partial event).

Without --prior/--tokenizer, tiny random models are built in a temporary directory: a 16 px
tokenizer (8x8 codes of 16) and a 3-class prior of width 32, depth 2 (the test suite's sizes).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import machine_header  # noqa: E402


def tiny_models(root: Path) -> tuple[Path, Path]:
    """Random weights: a request's cost does not depend on them."""
    import torch

    from stage1_tokenizer import VQGAN, QuantizerConfig, VQGANConfig
    from stage2_prior import GPTPrior, PriorConfig

    torch.manual_seed(0)
    tokenizer = VQGAN(VQGANConfig(resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                  z_channels=8, norm_groups=8, quantizer=QuantizerConfig(codebook_size=16, code_dim=4)))
    tokenizer.save_pretrained(root / "tokenizer")
    prior = GPTPrior(PriorConfig(vocab_sizes=(16,), code_shape=(8, 8), num_classes=3, dim=32, depth=2, heads=2))
    prior.save_pretrained(root / "prior", tokenizer_hash=tokenizer.content_hash())
    return root / "prior", root / "tokenizer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m vqgan serve ...` in a subprocess, up once /health answers."""

    def __init__(self, prior: Path, tokenizer: Path, threads: int, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        env.pop("VQGAN_API_KEY", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vqgan", "serve", "--prior", str(prior), "--tokenizer", str(tokenizer),
             "--port", str(self.port), "--log-level", "warning", *options],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("the server exited: " + self.process.stdout.read().decode()[-2000:])
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not answer /health within 180 s")
            time.sleep(0.2)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def client_loop(url: str, classes: int, until: float, seed: int, records: list) -> None:
    """Back-to-back n=1 requests until `until`; records (latency s, outcome) with outcome png / 503 / lost."""
    rng = random.Random(seed)
    with httpx.Client(timeout=60) as client:
        while time.perf_counter() < until:
            body = {"seed": rng.randrange(2**31), "class": rng.randrange(classes) if classes else None}
            start = time.perf_counter()
            try:
                response = client.post(f"{url}/v1/generate", json=body)
                ok = response.status_code == 200 and response.content[:8] == b"\x89PNG\r\n\x1a\n"
                outcome = "png" if ok else "503" if response.status_code == 503 else "lost"
            except httpx.HTTPError:
                outcome = "lost"
            records.append((time.perf_counter() - start, outcome))
            if outcome == "503":
                time.sleep(0.01)


def load(server: LiveServer, clients: int, seconds: float, classes: int) -> dict:
    for _ in range(3):  # warm-up: decoder cache, allocator
        httpx.post(f"{server.url}/v1/generate", json={"seed": 0, "class": 0 if classes else None}, timeout=60)
    per_client: list[list] = [[] for _ in range(clients)]
    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(server.url, classes, start + seconds, i, per_client[i]))
               for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    records = [r for rs in per_client for r in rs]
    latencies = sorted(t for t, outcome in records if outcome == "png")
    count = {o: sum(1 for _, outcome in records if outcome == o) for o in ("png", "503", "lost")}

    def p(q: float) -> float:  # the q-quantile in ms (nearest rank)
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {"requests": len(records), **count, "req_s": len(records) / elapsed, "img_s": count["png"] / elapsed,
            "p50_ms": p(0.5), "p95_ms": p(0.95), "per_call": server.health()["requests_per_call"]}


def streaming(server: LiveServer, count: int, classes: int) -> dict:
    first, total, client_first = [], [], []
    for i in range(count):
        start = time.perf_counter()
        seen_partial, final = None, None
        with httpx.stream("POST", f"{server.url}/v1/generate/stream", timeout=60,
                          json={"seed": i, "class": 0 if classes else None, "every_rows": 1}) as response:
            for line in response.iter_lines():
                if line == "event: partial" and seen_partial is None:
                    seen_partial = time.perf_counter() - start
                if line.startswith("data: ") and '"total_ms"' in line:
                    final = json.loads(line[6:])
        if final is None:
            raise RuntimeError(f"stream {i} ended without a final event")
        first.append(final["time_to_first_partial_ms"])
        total.append(final["total_ms"])
        if seen_partial is not None:
            client_first.append(1000 * seen_partial)
    median = lambda v: statistics.median(v) if v else float("nan")  # noqa: E731
    return {"first_ms": median([f for f in first if f is not None]), "total_ms": median(total),
            "client_first_ms": median(client_first)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", type=Path)
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration per configuration")
    parser.add_argument("--max-batch", type=int, default=16, help="the batching configuration's --max-batch")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--queue", type=int, default=64, help="the servers' --queue (small values show 503s)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--streams", type=int, default=5, help="sequential streaming requests (0 = skip)")
    args = parser.parse_args()
    if (args.prior is None) != (args.tokenizer is None):
        parser.error("give both --prior and --tokenizer, or neither (tiny random models)")
    if min(args.clients, args.max_batch, args.queue, args.threads) < 1 or args.seconds <= 0:
        parser.error("--clients, --max-batch, --queue, --threads and --seconds must be positive")

    print(machine_header())
    with tempfile.TemporaryDirectory() as tmp:
        prior, tokenizer = (args.prior, args.tokenizer) if args.prior else tiny_models(Path(tmp))
        classes = json.loads((prior / "config.json").read_text())["config"].get("num_classes", 0)
        print(f"prior {prior}, tokenizer {tokenizer}; {args.clients} clients x {args.seconds:g} s, "
              f"server threads {args.threads}, queue {args.queue}\n")
        print("| configuration | requests | png | 503 | lost | req/s | img/s | p50 ms | p95 ms | requests/call |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        lost = 0
        stream = None
        for name, batch in ((f"dynamic, max batch {args.max_batch}", args.max_batch), ("max batch 1", 1)):
            server = LiveServer(prior, tokenizer, args.threads, "--max-batch", str(batch), "--max-wait-ms",
                                str(args.max_wait_ms), "--queue", str(args.queue))
            try:
                r = load(server, args.clients, args.seconds, classes)
                if batch == args.max_batch and args.streams:
                    stream = streaming(server, args.streams, classes)
            finally:
                server.stop()
            lost += r["lost"]
            print(f"| {name} | {r['requests']} | {r['png']} | {r['503']} | {r['lost']} | {r['req_s']:.1f} | "
                  f"{r['img_s']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['per_call']} |", flush=True)
        if stream is not None:
            print(f"\nstreaming (idle server, every code row, median of {args.streams}): first partial "
                  f"{stream['first_ms']:.0f} ms (client saw it at {stream['client_first_ms']:.0f} ms), "
                  f"full image {stream['total_ms']:.0f} ms")
    print(f"\nload avg after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if lost:
        sys.exit(f"{lost} request(s) lost: neither an image nor an explicit 503")


if __name__ == "__main__":
    main()

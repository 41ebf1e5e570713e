"""Measure `visiontune.serve` throughput: requests/s with 1 client (batch 1) and with N concurrent clients.

    .venv/bin/python scripts/bench_serve.py --ckpt outputs/default_run/checkpoints/best.ckpt
    .venv/bin/python scripts/bench_serve.py --url http://127.0.0.1:8000 --images-from CKPT   # a running server

With --ckpt it starts the server itself (`python -m visiontune.serve`, 127.0.0.1, a free port) in its
own process, so clients and server do not share an interpreter, and stops it at the end. The request
bodies are PNG files of the checkpoint's own test images. Every request has a timeout, and the run
stops at the first failed request.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pngs(ckpt: str, n: int) -> list[bytes]:
    from visiontune.deploy.inference import raw_image
    from visiontune.deploy.session import InferenceSession

    datamodule = InferenceSession.from_checkpoint(ckpt, device="cpu").datamodule
    datamodule.setup("test")
    bodies = []
    for i in range(min(n, len(datamodule.test_set))):
        buffer = io.BytesIO()
        raw_image(datamodule.test_set, i).save(buffer, format="PNG")
        bodies.append(buffer.getvalue())
    return bodies


def wait_healthy(url: str, proc: subprocess.Popen | None, limit_s: float = 180) -> dict:
    deadline = time.time() + limit_s
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode} before it was healthy")
        try:
            return httpx.get(f"{url}/health", timeout=2).json()
        except httpx.HTTPError:
            time.sleep(0.5)
    raise SystemExit(f"no healthy server at {url} within {limit_s:.0f} s")


def run_clients(url: str, bodies: list[bytes], clients: int, requests: int) -> dict:
    """`requests` POSTs spread over `clients` threads, each with its own connection; wall time and latencies."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    per_client = [requests // clients + (1 if c < requests % clients else 0) for c in range(clients)]

    def client(c: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as session:
            for k in range(per_client[c]):
                if errors:
                    return
                body = bodies[(c * 7919 + k) % len(bodies)]
                start = time.perf_counter()
                response = session.post("/predict", content=body, headers={"content-type": "image/png"})
                elapsed = time.perf_counter() - start
                with lock:
                    if response.status_code != 200:
                        errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise SystemExit(f"request failed: {errors[0]}")
    latencies.sort()
    return {
        "clients": clients,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / wall,
        "latency_p50_ms": 1000 * statistics.median(latencies),
        "latency_p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt", help="start `visiontune.serve ckpt_path=CKPT` and benchmark it")
    parser.add_argument("--url", help="benchmark a server that is already running (needs --images-from)")
    parser.add_argument("--images-from", help="the checkpoint whose test images to send (default: --ckpt)")
    parser.add_argument("--requests", type=int, default=200, help="requests per measurement")
    parser.add_argument(
        "--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients to measure"
    )
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if bool(args.ckpt) == bool(args.url):
        parser.error("give --ckpt (start a server) or --url (use a running one)")
    source = args.images_from or args.ckpt
    if not source:
        parser.error("--url needs --images-from CKPT (whose test images to send)")
    bodies = test_pngs(source, 256)

    proc, url = None, args.url
    try:
        if args.ckpt:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            run_dir = tempfile.mkdtemp(prefix="bench_serve_")
            command = [sys.executable, "-m", "visiontune.serve", f"ckpt_path={args.ckpt}", f"port={port}",
                       f"max_batch_size={args.max_batch_size}", f"batch_timeout={args.batch_timeout}",
                       f"hydra.run.dir={run_dir}"]  # fmt: skip
            proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        health = wait_healthy(url, proc)
        run_clients(url, bodies, 1, 10)  # warm-up
        results = [run_clients(url, bodies, c, args.requests) for c in args.clients]
        batching = httpx.get(f"{url}/health", timeout=10).json()
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"server: {health['model']} (max_batch_size {health['max_batch_size']}), largest batch seen "
          f"{batching['largest_batch']}, {batching['requests']} requests in {batching['batches']} batches")  # fmt: skip
    print("| clients | requests/s | p50 latency (ms) | p95 latency (ms) |\n|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['clients']} | {r['requests_per_s']:.1f} | {r['latency_p50_ms']:.1f} | {r['latency_p95_ms']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"server": health, "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""Serving benchmark: the real `leadre serve` processes on loopback, driven by a load generator in its own process.

- recall: open-loop load at fixed request rates (one user, k=10 per request; users drawn at random, every one with
  a fresh near-line list published beforehand), for each online store (SQLite; Redis when `redis-server` is
  installed): p50/p95/p99 latency measured from each request's scheduled send time (so a stalled server cannot
  hide its queue), error counts. Target: p99 <= 10 ms at 500 requests/s on a 2-core machine, zero errors.
- nearline: one client sending requests of B users each, back to back: users/s and latency per request at
  B = 1..64 (the server's batcher takes up to 64 users per model call).

    .venv/bin/python bench/serving.py --bundle DIR --data DIR [--rates 100 250 500] [--duration 20]
        [--stores sqlite redis] [--batches 1 4 16 64] [--nearline-requests 10] [--quick]

`--bundle` is a `leadre bundle` directory and `--data` the data directory it was trained on (e.g. a `leadre demo`
run's deploy/current and data). `--quick` is a smoke run (short, low rates). Prints tables and writes
bench/results/serving.json. The load generator shares the machine's cores with the servers: run it on a quiet
machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from leadre import features
from leadre.serving import ServerProcess, free_port

RESULTS = Path(__file__).resolve().parent / "results" / "serving.json"
FEATURE_REPO = Path(__file__).resolve().parents[1] / "feature_repo"
BENCH_CONFIG = "serving:\n  max_batch: 64\n  max_users: 256\n"
CONNECTIONS = 64


class Connection:
    """A minimal keep-alive HTTP/1.1 client connection: the generator must cost far less than the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        return status, await self.reader.readexactly(length)


def _request(port: int, path: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


async def _open_loop(port: int, requests: list[bytes], rate: float) -> dict:
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(CONNECTIONS):
        pool.put_nowait(Connection(*await asyncio.open_connection("127.0.0.1", port)))
    latencies, errors = [], []
    loop = asyncio.get_running_loop()

    async def send(request: bytes, scheduled: float) -> None:
        conn = await pool.get()
        try:
            status, body = await conn.post(request)
            if status != 200:
                errors.append(f"{status}: {body[:200]!r}")
            latencies.append(loop.time() - scheduled)
            pool.put_nowait(conn)
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            errors.append(repr(e))
            pool.put_nowait(Connection(*await asyncio.open_connection("127.0.0.1", port)))

    tasks = []
    start = loop.time() + 0.05
    for i, request in enumerate(requests):
        scheduled = start + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(request, scheduled)))
    await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    while not pool.empty():
        pool.get_nowait().writer.close()
    return {"latencies": latencies, "errors": errors, "elapsed_s": elapsed}


async def _closed_loop(port: int, requests: list[bytes]) -> dict:
    conn = Connection(*await asyncio.open_connection("127.0.0.1", port))
    latencies, errors = [], []
    start = time.perf_counter()
    for request in requests:
        t0 = time.perf_counter()
        status, body = await conn.post(request)
        latencies.append(time.perf_counter() - t0)
        if status != 200:
            errors.append(f"{status}: {body[:200]!r}")
    elapsed = time.perf_counter() - start
    conn.writer.close()
    return {"latencies": latencies, "errors": errors, "elapsed_s": elapsed}


def _generator(kind: str, port: int, requests: list[bytes], rate: float, out: mp.Queue) -> None:
    """The load generator process: its own interpreter and event loop, so it does not share the servers' GIL.
    Its garbage collector is off for the run: a full collection over this process's heap (pandas, numpy and
    the leadre modules its parent imported) stalls its event loop for 100-200 ms, which the latencies would
    otherwise charge to the server."""
    gc.collect()
    gc.freeze()
    gc.disable()
    run = _open_loop(port, requests, rate) if kind == "open" else _closed_loop(port, requests)
    out.put(asyncio.run(run))


def drive(kind: str, port: int, requests: list[bytes], rate: float = 0.0) -> dict:
    out: mp.Queue = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(target=_generator, args=(kind, port, requests, rate, out))
    process.start()
    result = out.get()
    process.join()
    return result


def summary(result: dict, sent: int) -> dict:
    ms = np.array(result["latencies"]) * 1000 if result["latencies"] else np.array([np.nan])
    return {"sent": sent, "errors": len(result["errors"]), "first_errors": result["errors"][:3],
            "achieved_rps": round(sent / result["elapsed_s"], 1), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 2)}


def feature_repo(work: Path, data: Path, production: bool) -> Path:
    repo = work / ("repo-redis" if production else "repo-sqlite")
    shutil.copytree(FEATURE_REPO, repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    features.apply(repo, data, production=production)
    features.materialize(repo, data, production=production)
    return repo


def publish_lists(nearline: ServerProcess, users: list[str]) -> None:
    """Fresh near-line lists for every user, so recall answers come from Feast lists, not the fallback."""
    import httpx

    for i in range(0, len(users), 64):
        r = httpx.post(f"{nearline.url}/v1/models/nearline:predict", timeout=600,
                       json={"instances": [{"user_id": u} for u in users[i:i + 64]]})
        r.raise_for_status()


def bench_recall(args: argparse.Namespace, work: Path, store: str, users: list[str], env: dict[str, str]) -> list[dict]:
    production = store == "redis"
    repo = feature_repo(work, args.data, production)
    common = ["--bundle", str(args.bundle), "--feature-repo", str(repo), "--config", str(work / "serving.yaml")]
    common += ["--production"] if production else []
    nearline = ServerProcess("nearline", common, work / f"nearline-{store}.log", env=env).start()
    try:
        publish_lists(nearline, users)
    finally:
        nearline.stop()
    recall = ServerProcess("recall", common + ["--log-dir", str(work / f"requests-{store}")],  # fallback: the bundle's
                           work / f"recall-{store}.log", env=env).start()
    rng = random.Random(0)

    def requests(n: int) -> list[bytes]:  # one random user, k=10, per request
        return [_request(recall.port, "/v1/models/recall:predict",
                         {"instances": [{"user_id": rng.choice(users), "k": 10}]}) for _ in range(n)]

    rows = []
    try:
        drive("open", recall.port, requests(200), 200.0)  # warm-up
        for rate in args.rates:
            n = int(rate * args.duration)
            row = {"store": store, "rate": rate} | summary(drive("open", recall.port, requests(n), rate), n)
            rows.append(row)
            print(f"recall {store:<6} {rate:>6} req/s: p50 {row['p50_ms']:6.2f} ms  p95 {row['p95_ms']:6.2f} ms  "
                  f"p99 {row['p99_ms']:6.2f} ms  errors {row['errors']}", flush=True)
    finally:
        recall.stop()
    return rows


def bench_nearline(args: argparse.Namespace, work: Path, users: list[str]) -> list[dict]:
    repo = work / "repo-sqlite"
    nearline = ServerProcess("nearline", ["--bundle", str(args.bundle), "--feature-repo", str(repo), "--config",
                                          str(work / "serving.yaml")], work / "nearline-bench.log").start()
    rng = random.Random(1)
    rows = []
    try:
        for batch in args.batches:
            requests = [_request(nearline.port, "/v1/models/nearline:predict",
                                 {"instances": [{"user_id": u} for u in rng.sample(users, min(batch, len(users)))]})
                        for _ in range(args.nearline_requests + 1)]
            drive("closed", nearline.port, requests[:1])  # warm-up at this batch size
            result = drive("closed", nearline.port, requests[1:])
            row = {"batch": batch} | summary(result, len(requests) - 1)
            row["users_per_s"] = round(batch * row["sent"] / result["elapsed_s"], 1)
            rows.append(row)
            print(f"nearline batch {batch:>3}: {row['users_per_s']:8.1f} users/s  p50 {row['p50_ms']:8.1f} ms/request  "
                  f"errors {row['errors']}", flush=True)
    finally:
        nearline.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 250, 500])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per recall rate")
    parser.add_argument("--stores", nargs="+", choices=["sqlite", "redis"], default=["sqlite", "redis"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--nearline-requests", type=int, default=10, help="requests per near-line batch size")
    parser.add_argument("--quick", action="store_true", help="smoke run: rates 50 100, 3 s each, batches 1 8")
    args = parser.parse_args()
    if args.quick:
        args.rates, args.duration, args.batches, args.nearline_requests = [50, 100], 3.0, [1, 8], 3
    users = pd.read_parquet(args.data / "users.parquet")["user_id"].tolist()
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                     "target": "recall p99 <= 10 ms at 500 requests/s, zero errors", "recall": [], "nearline": []}
    with tempfile.TemporaryDirectory(prefix="leadre-bench-serving-") as tmp:
        work = Path(tmp)
        (work / "serving.yaml").write_text(BENCH_CONFIG)
        for store in args.stores:
            env: dict[str, str] = {}
            redis = None
            if store == "redis":
                binary = shutil.which("redis-server")
                if binary is None:
                    print("redis-server not installed: Redis online store skipped")
                    continue
                port = free_port()
                redis = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                          "--appendonly", "no"], stdout=subprocess.DEVNULL)
                time.sleep(0.5)
                env = {"REDIS_CONNECTION_STRING": f"127.0.0.1:{port}", "FEAST_REGISTRY_PATH": str(work / "registry.db")}
                os.environ.update(env)  # this process applies and materialises the production repository too
            try:
                results["recall"] += bench_recall(args, work, store, users, env)
            finally:
                if redis is not None:
                    redis.terminate()
                    redis.wait()
        if "sqlite" not in args.stores:
            feature_repo(work, args.data, production=False)
        results["nearline"] = bench_nearline(args, work, users)

    print("\nrecall (open loop, 1 user k=10 per request)")
    print(f"{'store':<7}{'req/s':>7}{'achieved':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for r in results["recall"]:
        print(f"{r['store']:<7}{r['rate']:>7.0f}{r['achieved_rps']:>10.1f}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}"
              f"{r['p99_ms']:>9.2f}{r['errors']:>8}")
    print("\nnearline (closed loop, B users per request)")
    print(f"{'B':>4}{'users/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for r in results["nearline"]:
        print(f"{r['batch']:>4}{r['users_per_s']:>10.1f}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}{r['errors']:>8}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()

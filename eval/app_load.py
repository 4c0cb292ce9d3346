"""Load test of the mmfast app: N concurrent gradio_client users for a fixed time, on loopback.

    python eval/app_load.py --users 20 --seconds 120 --json eval/results/app-load.json --md eval/results/app-load.md

Starts `mmfast app` (the zoo models) in a subprocess, then every user (one thread, one Client = one browser
session) loops over a mix of real requests: image QA on a held-out scene (70%), video QA on a held-out clip (20%),
generation of 3 digits (10%), each with the app's default 3 timed runs. Records every request's latency and outcome,
the queue positions gradio reports while a request waits, and the server's resident memory (``/proc/PID/status``)
once a second. Nothing fails on purpose: the queue (``max_size``) is larger than the number of users.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its children, MB (Linux)."""
    total = 0
    pids = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(k) for k in kids]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def wait_up(url: str, timeout: float = 180.0) -> None:
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(1)
    raise SystemExit(f"the app did not come up at {url} in {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--port", type=int, default=7873)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio_client import Client, handle_file

    from mmfast.apps.common import image_examples, video_examples

    scenes = image_examples(True)[:3]
    clip, clip_q = video_examples(True)[0]
    url = f"http://127.0.0.1:{args.port}/"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "-m", "mmfast", "app", "--port", str(args.port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    mem: list[tuple[float, float]] = []
    results: list[dict] = []
    lock = threading.Lock()
    stop = threading.Event()
    try:
        wait_up(url)
        t_up = time.time()
        mem.append((0.0, rss_mb(server.pid)))

        def sample() -> None:
            while not stop.is_set():
                mem.append((time.time() - t_up, rss_mb(server.pid)))
                time.sleep(1.0)

        def user(k: int) -> None:
            rng = random.Random(k)
            client = Client(url, verbose=False)
            while not stop.is_set():
                r = rng.random()
                if r < 0.7:
                    path, q = rng.choice(scenes)
                    kind, call = "image-qa", (handle_file(path), None, q, "pool(factor=2)", 8, 8, 3)
                    api = "/answer"
                elif r < 0.9:
                    kind, call, api = "video-qa", (None, handle_file(clip), clip_q, "turbo(keep=0.25)", 8, 8, 3), "/answer"
                else:
                    kind, call, api = "generate", ("1,4,7", "sjd(window=16)", k, 1, 3), "/generate"
                t0 = time.time()
                job = client.submit(*call, api_name=api)
                ranks = []
                while not job.done():
                    st = job.status()
                    if st.rank is not None:
                        ranks.append(st.rank)
                    time.sleep(0.2)
                try:
                    job.result()
                    ok, err = True, None
                except Exception as e:  # noqa: BLE001 - a failed request is what we count
                    ok, err = False, f"{type(e).__name__}: {e}"
                with lock:
                    results.append({"user": k, "kind": kind, "ok": ok, "error": err, "latency_s": time.time() - t0,
                                    "max_queue_position": max(ranks) if ranks else None,
                                    "end_s": time.time() - t_up})

        threads = [threading.Thread(target=sample, daemon=True)]
        threads += [threading.Thread(target=user, args=(k,), daemon=True) for k in range(args.users)]
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        stop.set()
        for t in threads[1:]:
            t.join(timeout=300)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    lat = sorted(r["latency_s"] for r in results)
    ranks = [r["max_queue_position"] for r in results if r["max_queue_position"] is not None]

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))] if lat else float("nan")

    peak = max(m for _, m in mem)
    warm = [m for t, m in mem if t >= 30] or [peak]
    summary = {
        "users": args.users, "seconds": args.seconds, "requests": len(results),
        "failures": sum(not r["ok"] for r in results),
        "by_kind": {k: sum(r["kind"] == k for r in results) for k in ("image-qa", "video-qa", "generate")},
        "latency_p50_s": round(pct(0.5), 2), "latency_p95_s": round(pct(0.95), 2),
        "latency_max_s": round(lat[-1], 2) if lat else None,
        "median_latency_by_kind_s": {k: round(statistics.median([r["latency_s"] for r in results if r["kind"] == k]), 2)
                                     for k in ("image-qa", "video-qa", "generate")
                                     if any(r["kind"] == k for r in results)},
        "queue_position_max": max(ranks) if ranks else None,
        "queue_position_median": statistics.median(ranks) if ranks else None,
        "requests_that_saw_a_queue_position": len(ranks),
        "rss_mb_start": round(mem[0][1], 1), "rss_mb_peak": round(peak, 1),
        "rss_mb_after_30s_min_max": [round(min(warm), 1), round(max(warm), 1)],
        "errors": sorted({r["error"] for r in results if r["error"]})[:5],
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        from mmfast.bench.harness import provenance

        args.json.write_text(json.dumps({"summary": summary, "memory_mb": mem, "requests": results,
                                         "meta": provenance()}, indent=2))
    if args.md:
        lines = ["### app load test", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in summary.items()]
        lines += ["", f"`python eval/app_load.py --users {args.users} --seconds {args.seconds:.0f}` on this machine "
                      "(loopback; the app and the clients share the CPU)."]
        args.md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

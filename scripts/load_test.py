"""Load on a running `dalle serve`: C clients for T seconds, then what came back.

  python scripts/load_test.py --url http://127.0.0.1:7860 --clients 16 --seconds 60

Each client posts /api/generate (4 candidates, keep 1) in a loop; after a 429 it waits the
Retry-After it was given; one request in five is abandoned after 0.3 s (its client goes
away), which must free its place. Loopback addresses only, at most 64 clients and 600 s.
Prints requests, 200s, 429s, abandoned, other errors, p50/p95 latency of the 200s and the
server's resident memory before (after one warm-up request) and after; the last line is JSON.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import socket
import statistics
import threading
import time
import urllib.error
import urllib.parse
import urllib.request


def loopback_only(url: str) -> str:
    host = urllib.parse.urlparse(url).hostname or ""
    address = socket.gethostbyname(host)
    if not ipaddress.ip_address(address).is_loopback:
        raise SystemExit(f"load_test.py only loads this machine (loopback), not {host} ({address})")
    return url.rstrip("/")


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/health", timeout=30) as reply:
        return json.loads(reply.read())


def client(url: str, deadline: float, seed: int, results: list, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        abandon = rng.random() < 0.2
        body = json.dumps({"prompt": rng.choice(["a red circle", "a blue square in the top left",
                                                 "a green triangle above a white circle"]),
                           "candidates": 4, "keep": 1, "seed": rng.randrange(1000)}).encode()
        request = urllib.request.Request(f"{url}/api/generate", data=body, headers={"Content-Type": "application/json"})
        started = time.monotonic()
        outcome, wait = "error", 0.0
        try:
            with urllib.request.urlopen(request, timeout=0.3 if abandon else 120) as reply:
                json.loads(reply.read())
                outcome = "200"
        except urllib.error.HTTPError as error:
            outcome = "429" if error.code == 429 else f"http {error.code}"
            wait = float(error.headers.get("Retry-After", "1")) if error.code == 429 else 0.0
        except TimeoutError:
            outcome = "abandoned" if abandon else "timeout"
        except (urllib.error.URLError, ConnectionError) as error:
            outcome = "abandoned" if abandon and "timed out" in str(error) else f"error {error}"
        with lock:
            results.append((outcome, time.monotonic() - started))
        if wait:
            time.sleep(min(wait, max(0.0, deadline - time.monotonic())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    if not 1 <= args.clients <= 64 or not 1 <= args.seconds <= 600:
        raise SystemExit("--clients must be in [1, 64] and --seconds in [1, 600]")
    url = loopback_only(args.url)
    warm = json.dumps({"prompt": "a red circle", "candidates": 4, "keep": 1}).encode()  # first call: lazy set-up
    urllib.request.urlopen(urllib.request.Request(f"{url}/api/generate", data=warm,
                                                  headers={"Content-Type": "application/json"}), timeout=120).read()
    before = health(url)
    results: list[tuple[str, float]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds
    threads = [threading.Thread(target=client, args=(url, deadline, i, results, lock)) for i in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    time.sleep(2)  # abandoned jobs leave the queue
    after = health(url)
    counts: dict[str, int] = {}
    for outcome, _ in results:
        counts[outcome] = counts.get(outcome, 0) + 1
    latencies = sorted(seconds for outcome, seconds in results if outcome == "200")
    p50 = statistics.median(latencies) if latencies else None
    p95 = latencies[int(0.95 * (len(latencies) - 1))] if latencies else None
    others = {k: v for k, v in counts.items() if k not in ("200", "429", "abandoned")}
    summary = {"requests": len(results), "ok": counts.get("200", 0), "busy_429": counts.get("429", 0),
               "abandoned": counts.get("abandoned", 0), "other_errors": sum(others.values()), "errors": others,
               "p50_s": p50, "p95_s": p95, "memory_mb_before": before.get("memory_mb"),
               "memory_mb_after": after.get("memory_mb"), "queue_after": after.get("queue"),
               "clients": args.clients, "seconds": args.seconds}
    print(f"{summary['requests']} requests: {summary['ok']} answered 200, {summary['busy_429']} 429, "
          f"{summary['abandoned']} abandoned by their client, {summary['other_errors']} other errors {others or ''}")
    if latencies:
        print(f"latency of the 200s: p50 {p50:.2f} s, p95 {p95:.2f} s")
    print(f"server memory: {summary['memory_mb_before']} MB before, {summary['memory_mb_after']} MB after; "
          f"queue after: {summary['queue_after']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

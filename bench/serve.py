"""``diffrt bench serve``: MLPerf-style load scenarios against running ``diffrt serve`` endpoints.

- SingleStream: one request at a time; p50/p90 latency.
- Offline: ``--count`` requests kept ``--concurrency`` in flight; images/s over the whole run.
- Server: Poisson arrivals at ``--rate`` requests/s (open loop: a late answer does not delay the next arrival;
  latency counts from the scheduled arrival); p50/p99 latency. ``--find-max`` bisects for the highest rate whose
  p99 stays within ``--p99-bound`` with no error, between 0 and the Offline rate.

Several ``--url``s are measured side by side: every round runs each scenario on each endpoint in turn, and the
tables quote medians over rounds. Loopback endpoints only, and every run is bounded in requests (``--count``)
and time (``--max-duration``). Only the standard library talks HTTP here, so the load generator stays light.
"""

from __future__ import annotations

import argparse
import base64
import collections
import http.client
import json
import random
import statistics
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from .harness import percentiles, write_result

SCENARIOS = ("single", "offline", "server")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_COUNT = 2000
MAX_THREADS = 256  # the open loop's senders: more than this many requests in flight is past any bound anyway
ENDPOINT = "v1/images/generations"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", action="append", default=[], help="a diffrt serve endpoint on this machine "
                        "(repeat to compare; default http://127.0.0.1:8000/)")  # fmt: skip
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, default=[],
                        help="single, offline, server (repeat; default all three)")
    parser.add_argument("--count", type=int, default=32, help=f"requests per run (at most {MAX_COUNT}; default 32)")
    parser.add_argument("--concurrency", type=int, default=8, help="Offline: requests in flight (default 8)")
    parser.add_argument("--rate", type=float, default=None, help="Server: arrivals per second (default: half the "
                        "Offline rate of the same endpoint and round)")  # fmt: skip
    parser.add_argument("--find-max", action="store_true", help="Server: bisect for the highest rate with p99 "
                        "within --p99-bound")  # fmt: skip
    parser.add_argument("--p99-bound", type=float, default=1.0, help="seconds (default 1)")
    parser.add_argument("--search-steps", type=int, default=5, help="--find-max's bisection steps (default 5)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over the endpoints (default 1)")
    parser.add_argument("--prompt", default="an ankle boot")
    parser.add_argument("--n", type=int, default=1, help="images per request (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="default: the server's model's")
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--seed", type=int, default=0, help="request k gets seed + k; the arrivals' random seed")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    parser.add_argument("--max-duration", type=float, default=120.0, help="seconds per run; later arrivals are "
                        "not sent (default 120)")  # fmt: skip
    parser.add_argument("--out", default="serve.json", help="JSON result file")
    parser.set_defaults(run=run)


def endpoint(url: str) -> tuple[str, int, str]:
    """(host, port, path of the images endpoint) of a loopback ``diffrt serve`` URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK:
        raise ValueError(f"--url {url!r}: bench serve loads servers on this machine only: http:// on "
                         f"{', '.join(LOOPBACK)}")  # fmt: skip
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return parts.hostname, parts.port or 80, path + ENDPOINT


def check(args) -> None:
    for name, low in (("count", 1), ("concurrency", 1), ("rounds", 1), ("n", 1), ("search_steps", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.count > MAX_COUNT:
        raise ValueError(f"--count must be at most {MAX_COUNT} (a bounded load test), got {args.count}")
    for name in ("p99_bound", "timeout", "max_duration"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.rate is not None and not args.rate > 0:
        raise ValueError(f"--rate must be > 0 requests/s, got {args.rate}")


# ------------------------------------------------------------------------------------------------ requests
def body(args, k: int) -> dict:
    request = {"prompt": args.prompt, "n": args.n, "seed": args.seed + k}
    request.update({key: getattr(args, key) for key in ("steps", "sampler") if getattr(args, key) is not None})
    return request


def post(target: tuple[str, int, str], request: dict, timeout: float) -> dict:
    """One request: its status, seconds and images (0 unless every image decodes as a PNG)."""
    host, port, path = target
    start = time.perf_counter()
    try:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
        connection.request("POST", path, json.dumps(request), {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload, status = response.read(), response.status
        connection.close()
    except (OSError, http.client.HTTPException) as err:
        return {"status": None, "seconds": time.perf_counter() - start, "images": 0, "error": str(err)}
    seconds = time.perf_counter() - start
    images = 0
    if status == 200:
        data = json.loads(payload)["data"]
        images = sum(base64.b64decode(item["b64_json"]).startswith(b"\x89PNG") for item in data)
    return {"status": status, "seconds": seconds, "images": images}


def closed_loop(target, args, concurrency: int) -> tuple[list[dict], float]:
    """``--count`` requests, ``concurrency`` in flight; the records and the wall time."""
    deadline = time.perf_counter() + args.max_duration
    start = time.perf_counter()

    def send(k: int) -> dict | None:
        return post(target, body(args, k), args.timeout) if time.perf_counter() < deadline else None

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        records = [r for r in pool.map(send, range(args.count)) if r is not None]
    return records, time.perf_counter() - start


def open_loop(target, args, rate: float, rng: random.Random) -> tuple[list[dict], float]:
    """``--count`` requests at Poisson arrivals of ``rate``/s; latency from each scheduled arrival."""
    arrivals, at = [], 0.0
    for _ in range(args.count):
        at += rng.expovariate(rate)
        arrivals.append(at)
    start = time.perf_counter()
    records: list[dict] = []
    lock = threading.Lock()

    def send(k: int) -> None:
        if arrivals[k] > args.max_duration:
            return
        time.sleep(max(0.0, start + arrivals[k] - time.perf_counter()))
        record = post(target, body(args, k), args.timeout)
        record["seconds"] = time.perf_counter() - (start + arrivals[k])
        with lock:
            records.append(record)

    with ThreadPoolExecutor(max_workers=min(args.count, MAX_THREADS)) as pool:
        list(pool.map(send, range(args.count)))
    return records, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- scenarios
def summarize(records: list[dict], wall: float) -> dict:
    ok = [r for r in records if r["status"] == 200 and r["images"]]
    codes = dict(collections.Counter(str(r["status"]) for r in records))
    stats = percentiles([r["seconds"] for r in ok]) if ok else {"p50": None, "p90": None, "p99": None, "min": None}
    return {"requests": len(records), "answered": len(ok), "statuses": codes, "wall_s": wall,
            "images": sum(r["images"] for r in ok), "images_per_s": sum(r["images"] for r in ok) / wall,
            "latency_s": stats}  # fmt: skip


def single_stream(target, args) -> dict:
    return summarize(*closed_loop(target, args, 1))


def offline(target, args) -> dict:
    return summarize(*closed_loop(target, args, args.concurrency))


def server(target, args, rate: float, rng: random.Random) -> dict:
    result = summarize(*open_loop(target, args, rate, rng))
    p99 = result["latency_s"]["p99"]
    result.update(rate=rate, meets_bound=result["answered"] == args.count and p99 is not None
                  and p99 <= args.p99_bound)  # fmt: skip
    return result


def find_max(target, args, ceiling: float, rng: random.Random) -> dict:
    """Bisect (0, ceiling] for the highest Poisson rate whose p99 is within the bound, every request answered."""
    low, high, trials = 0.0, ceiling, []
    for _ in range(args.search_steps):
        rate = (low + high) / 2
        trial = server(target, args, rate, rng)
        trials.append(trial)
        low, high = (rate, high) if trial["meets_bound"] else (low, rate)
    return {"max_rate": low or None, "ceiling": ceiling, "trials": trials}


def measure(args) -> tuple[dict, dict]:
    check(args)
    urls = args.url or ["http://127.0.0.1:8000/"]
    targets = {url: endpoint(url) for url in urls}
    scenarios = args.scenario or list(SCENARIOS)
    rng = random.Random(args.seed)
    rounds: dict[str, dict[str, list]] = {url: {} for url in urls}
    for _ in range(args.rounds):
        for url, target in targets.items():
            offline_rate = None
            for scenario in scenarios:
                if scenario == "single":
                    result = single_stream(target, args)
                elif scenario == "offline":
                    result = offline(target, args)
                    offline_rate = result["answered"] / result["wall_s"]
                else:
                    ceiling = offline_rate if offline_rate is not None else _offline_rate(target, args)
                    if not ceiling:
                        raise ValueError(f"{url}: the Offline run answered no request, so the Server scenario has no "
                                         "rate to aim at: is the server up (GET /health)?")  # fmt: skip
                    result = (find_max(target, args, ceiling, rng) if args.find_max
                              else server(target, args, args.rate or ceiling / 2, rng))  # fmt: skip
                rounds[url].setdefault(scenario, []).append(result)
    settings = {key: getattr(args, key) for key in ("count", "concurrency", "rate", "find_max", "p99_bound",
                                                    "search_steps", "rounds", "prompt", "n", "steps", "sampler",
                                                    "seed", "timeout", "max_duration")}  # fmt: skip
    settings.update(urls=urls, scenarios=scenarios, servers={url: _server_info(target) for url, target in
                                                            targets.items()})  # fmt: skip
    return settings, {"endpoints": {url: _medians(runs) for url, runs in rounds.items()}, "rounds": rounds}


def _offline_rate(target, args) -> float:
    result = offline(target, args)
    return result["answered"] / result["wall_s"]


def _server_info(target) -> dict | None:
    """The endpoint's /v1/models record (model, backend, max batch, replicas), to stamp the result with."""
    host, port, path = target
    try:
        connection = http.client.HTTPConnection(host, port, timeout=10)
        connection.request("GET", path.removesuffix(ENDPOINT) + "v1/models")
        return json.loads(connection.getresponse().read())["data"][0]["diffrt"]
    except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError):
        return None


def _medians(runs: dict[str, list]) -> dict:
    """Per scenario, the median over rounds of its headline numbers."""
    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    out = {}
    for scenario, results in runs.items():
        if scenario == "server" and "trials" in results[0]:
            out[scenario] = {"max_rate": median([r["max_rate"] for r in results])}
            continue
        out[scenario] = {"images_per_s": median([r["images_per_s"] for r in results]),
                         "p50_s": median([r["latency_s"]["p50"] for r in results]),
                         "p90_s": median([r["latency_s"]["p90"] for r in results]),
                         "p99_s": median([r["latency_s"]["p99"] for r in results]),
                         "errors": sum(r["requests"] - r["answered"] for r in results)}  # fmt: skip
        if scenario == "server":
            out[scenario]["rate"] = median([r["rate"] for r in results])
    return out


HEADER = ["endpoint", "max batch", "scenario", "images/s", "p50 s", "p90 s", "p99 s", "errors", "note"]


def rows(settings: dict, metrics: dict) -> list[list[str]]:
    """One row per endpoint and scenario: the medians over rounds (the table and ``bench report``'s)."""
    def num(value, spec=".3f"):
        return format(value, spec) if value is not None else "-"

    out = []
    for url, scenarios in metrics["endpoints"].items():
        batch = str((settings["servers"].get(url) or {}).get("max_batch", "?"))
        for scenario, m in scenarios.items():
            if "max_rate" in m:
                note = f"max rate with p99 <= {settings['p99_bound']:g} s: {num(m['max_rate'], '.2f')} req/s"
                out.append([url, batch, scenario, "", "", "", "", "", note])
                continue
            note = f"Poisson {m['rate']:.2f} req/s" if scenario == "server" else ""
            out.append([url, batch, scenario, num(m["images_per_s"], ".2f"), num(m["p50_s"]), num(m["p90_s"]),
                        num(m["p99_s"]), str(m["errors"]), note])  # fmt: skip
    return out


def table(settings: dict, metrics: dict) -> str:
    lines = [HEADER, *rows(settings, metrics)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[-1]
                     for line in lines)


def run(args) -> int:
    settings, metrics = measure(args)
    print(table(settings, metrics))
    path = write_result(args.out, "serve", settings, metrics)
    print(f"wrote {path}")
    return 0

"""Load-test `pneumoscan serve` over loopback: N concurrent clients, p50/p99/max latency, errors.

    .venv/bin/python -m benchmarks.scale.serve_load [--clients 50] [--requests 20] [--max-seconds 60]
        [--keep-alive] [--url http://127.0.0.1:PORT/]

Without --url it starts `python -m pneumoscan serve` (the bundled model) on a free 127.0.0.1
port in a child process, so that the clients' threads do not share the server's interpreter,
and stops it at the end. With --url it loads a server already running on this machine (only
127.0.0.1, ::1 and localhost are accepted): that is how the figures before a change are taken.

Every client (a thread) starts at the same moment, then sends `--requests` GETs in turn over
PATHS, one new connection each (or one kept-alive connection with --keep-alive), and times each
from connect to the last byte of the body. The run is bounded: clients x requests requests at
most, no new request after --max-seconds, 10 s per request. Prints the figures BENCHMARKS.md
records.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import math
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

PATHS = ["/", "/static/app.js", "/static/preprocess.js", "/model/metadata.json", "/healthz"]
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
REQUEST_TIMEOUT_S = 10
START_TIMEOUT_S = 120


def percentile(sorted_values: list[float], share: float) -> float:
    """Nearest-rank percentile of an ascending list (`share` in (0, 1])."""
    return sorted_values[max(0, math.ceil(share * len(sorted_values)) - 1)]


class Client(threading.Thread):
    """One simulated client: `requests` GETs after the common start; latencies and errors."""

    def __init__(self, host: str, port: int, requests: int, keep_alive: bool, start, stop_at: list):
        super().__init__(daemon=True)
        self.host, self.port, self.requests, self.keep_alive = host, port, requests, keep_alive
        self.start_barrier, self.stop_at = start, stop_at
        self.latencies: list[float] = []
        self.errors: collections.Counter = collections.Counter()

    def run(self) -> None:
        self.start_barrier.wait()
        connection = None
        for index in range(self.requests):
            if time.monotonic() > self.stop_at[0]:
                break
            began = time.perf_counter()
            try:
                if connection is None:
                    connection = http.client.HTTPConnection(self.host, self.port, timeout=REQUEST_TIMEOUT_S)
                connection.request("GET", PATHS[index % len(PATHS)])
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    self.errors[f"HTTP {response.status}"] += 1
                    continue
                self.latencies.append(time.perf_counter() - began)
            except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, cut
                self.errors[type(error).__name__] += 1
                connection.close()
                connection = None
                continue
            if not self.keep_alive:
                connection.close()
                connection = None
        if connection is not None:
            connection.close()


def run_load(host: str, port: int, clients: int, requests: int, keep_alive: bool, max_seconds: float) -> dict:
    start = threading.Barrier(clients + 1)
    stop_at = [math.inf]
    threads = [Client(host, port, requests, keep_alive, start, stop_at) for _ in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.monotonic() + max_seconds
    began = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    latencies = sorted(latency for thread in threads for latency in thread.latencies)
    errors = sum((thread.errors for thread in threads), collections.Counter())
    return {"latencies": latencies, "errors": errors, "wall": wall}


def start_server() -> tuple[subprocess.Popen, int]:
    """`python -m pneumoscan serve` on a free loopback port, once /healthz answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "pneumoscan", "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"serve_load: `{' '.join(command)}` exited with {server.returncode}.")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                connection.close()
                return server, port
        except OSError:
            time.sleep(0.2)
    server.kill()
    sys.exit(f"serve_load: the server did not answer within {START_TIMEOUT_S} s.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=20, help="per client")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="no new request after this")
    parser.add_argument("--keep-alive", action="store_true", help="one connection per client")
    parser.add_argument("--url", help="a running server on this machine (default: start one)")
    args = parser.parse_args(argv)
    if not (1 <= args.clients <= 1000 and 1 <= args.requests <= 10_000):
        parser.error("--clients must be 1..1000 and --requests 1..10000")
    server = None
    if args.url:
        parts = urlsplit(args.url)
        if parts.hostname not in LOOPBACK or parts.port is None:
            parser.error("--url must be http://127.0.0.1:PORT/ (or ::1, localhost): loopback only")
        host, port = parts.hostname, parts.port
    else:
        server, port = start_server()
        host = "127.0.0.1"
    try:
        result = run_load(host, port, args.clients, args.requests, args.keep_alive, args.max_seconds)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
    latencies, errors = result["latencies"], result["errors"]
    mode = "one kept-alive connection per client" if args.keep_alive else "a new connection per request"
    print(f"serve_load: {args.clients} clients x {args.requests} requests, {mode}, http://{host}:{port}/")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(
        f"answered {len(latencies)}, errors {sum(errors.values())}"
        + (f" ({', '.join(f'{kind} {count}' for kind, count in sorted(errors.items()))})" if errors else "")
        + f", wall {result['wall']:.2f} s, {len(latencies) / result['wall']:.0f} requests/s"
    )
    if latencies:
        figures = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}
        print(
            "latency ms: "
            + "  ".join(f"{k} {1000 * percentile(latencies, q):.1f}" for k, q in figures.items())
        )


if __name__ == "__main__":
    main()

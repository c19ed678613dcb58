"""Measure the API's overhead against a bare Klein route, over real sockets.

Run: ``python bench/bench_api.py [--seconds N] [--concurrency C]``.

A server process runs, in one reactor, a whole node (its own fresh database
on the test PostgreSQL server, ``GITLAWB_TEST_DATABASE_URL``, rate limits
off) and a bare Klein app whose one route answers a constant.  This process
drives both over keep-alive HTTP/1.1 connections, C at a time, and prints
req/s and latency percentiles for:

- ``GET /api/v1/repos/{owner}/{repo}`` (unsigned, as ``gl repo info`` without
  an identity) against ``GET /const``;
- signed ``POST /api/v1/repos`` (each a new repository: a row and a bare
  repository made by git) against ``POST /const`` with the same headers
  and body;

then the ratio of each pair.  Requests are built and signed before the
clock starts, so the client's signing is not measured.  About a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


# -- The server process --------------------------------------------------------------


def serve(database_url: str, data_dir: str) -> None:
    """
    Run the node and the bare app in this process until SIGTERM; print one
    JSON line with both ports once the node's database is ready.
    """
    from klein import Klein
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.web.server import Site

    from gitlawb.config import Settings
    from gitlawb.node import make_node

    log_file = open(Path(data_dir) / "node.log", "a")
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(log_file)], redirectStandardIO=False
    )
    settings = Settings.load(
        environ={
            "GITLAWB_DATA_DIR": data_dir,
            "DATABASE_URL": database_url,
            "GITLAWB_HOST": "127.0.0.1",
            "GITLAWB_PORT": "0",
            "GITLAWB_P2P_PORT": "0",
            "GITLAWB_ACCESS_LOG": os.environ.get("GITLAWB_ACCESS_LOG", "true"),
            "GITLAWB_SIGNER_RATE_LIMIT": "0",
            "GITLAWB_CREATE_RATE_LIMIT": "0",
            "GITLAWB_DB_POOL_SIZE": os.environ.get("GITLAWB_DB_POOL_SIZE", "5"),
        }
    )
    node = make_node(settings, reactor)

    bare = Klein()

    @bare.route("/const", methods=["GET", "POST"])
    def constant(request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return b'{"status":"ok"}'

    bare_port = reactor.listenTCP(0, Site(bare.resource()), interface="127.0.0.1")  # type: ignore[attr-defined]

    async def start() -> None:
        node.privilegedStartService()
        node.startService()
        await node.getServiceNamed("database").when_ready()
        api = node.getServiceNamed("api")
        line = {"node_port": api.bound_port, "bare_port": bare_port.getHost().port}
        print(json.dumps(line), flush=True)

    def stop() -> Deferred[None]:
        return node.stopService()  # type: ignore[no-any-return]

    reactor.addSystemEventTrigger("before", "shutdown", stop)  # type: ignore[attr-defined]
    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(start()))  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


# -- The client ----------------------------------------------------------------------


@dataclass
class Result:
    label: str
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        index = min(len(ordered) - 1, int(fraction * len(ordered)))
        return ordered[index] * 1000

    def line(self) -> str:
        codes = ",".join(f"{k}x{v}" for k, v in sorted(self.statuses.items()))
        return (
            f"{self.label:<44} {len(self.latencies):>7} {self.rate:>9.1f}"
            f" {self.percentile(0.5):>8.2f} {self.percentile(0.99):>8.2f}  {codes}"
        )


async def read_response(reader: asyncio.StreamReader) -> int:
    """
    Read one HTTP/1.1 response (Content-Length or chunked) and return its
    status.
    """
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def drive(
    label: str,
    port: int,
    requests: list[bytes],
    concurrency: int,
    seconds: float,
) -> Result:
    """
    Send C{requests} (raw request bytes, each used once) over C{concurrency}
    keep-alive connections until they run out or C{seconds} pass.
    """
    result = Result(label)
    queue = list(reversed(requests))
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while queue and time.perf_counter() < deadline:
                raw = queue.pop()
                started = time.perf_counter()
                writer.write(raw)
                status = await read_response(reader)
                result.latencies.append(time.perf_counter() - started)
                result.statuses[status] = result.statuses.get(status, 0) + 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - started
    return result


def raw_request(
    method: str, target: str, headers: dict[str, str], body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def signed_creates(count: int, prefix: str) -> list[tuple[dict[str, str], bytes]]:
    from gitlawb.identity.keys import NodeKey
    from gitlawb.identity.signatures import sign_request

    # Several agents, so that no one signer's row or lock is the bottleneck.
    keys = [NodeKey.generate() for _ in range(8)]
    created = int(time.time())
    signed = []
    for number in range(count):
        body = json.dumps(
            {
                "default_branch": "main",
                "description": None,
                "is_public": True,
                "name": f"{prefix}{number}",
            },
            separators=(",", ":"),
            sort_keys=True,
        ).encode()
        headers = sign_request(keys[number % 8], "POST", "/api/v1/repos", body, created)
        headers["Content-Type"] = "application/json"
        signed.append((headers, body))
    return signed


async def bench(
    node_port: int, bare_port: int, seconds: float, concurrency: int
) -> None:
    from gitlawb.identity.keys import NodeKey
    from gitlawb.identity.signatures import sign_request

    # One repository to read.
    owner = NodeKey.generate()
    body = b'{"name":"target"}'
    headers = sign_request(owner, "POST", "/api/v1/repos", body, int(time.time()))
    headers["Content-Type"] = "application/json"
    setup = await drive(
        "setup", node_port, [raw_request("POST", "/api/v1/repos", headers, body)], 1, 30
    )
    assert setup.statuses == {201: 1}, setup.statuses

    get_target = f"/api/v1/repos/{owner.short}/target"
    gets = [raw_request("GET", get_target, {})] * 2_000_000
    const_gets = [raw_request("GET", "/const", {})] * 2_000_000

    # Creates: enough for the time allowed at any plausible rate.
    creates = signed_creates(6000, "bench")
    post_requests = [raw_request("POST", "/api/v1/repos", h, b) for h, b in creates]
    const_posts = [raw_request("POST", "/const", h, b) for h, b in creates] * 200

    # Warm both servers up, then measure.
    await drive("warm", bare_port, const_gets[:2000], concurrency, 5)
    await drive("warm", node_port, gets[:2000], concurrency, 5)

    results = [
        await drive(
            "bare Klein GET /const", bare_port, const_gets, concurrency, seconds
        ),
        await drive(
            "node GET /api/v1/repos/{owner}/{repo}",
            node_port,
            gets,
            concurrency,
            seconds,
        ),
        await drive(
            "bare Klein POST /const", bare_port, const_posts, concurrency, seconds
        ),
        await drive(
            "node POST /api/v1/repos (signed, creates)",
            node_port,
            post_requests,
            concurrency,
            seconds,
        ),
    ]

    print(f"\nconcurrency {concurrency}, up to {seconds:g} s per run\n")
    header = ("route", "requests", "req/s", "p50 ms", "p99 ms")
    print("{:<44} {:>7} {:>9} {:>8} {:>8}  status".format(*header))
    for result in results:
        print(result.line())
    bare_get, node_get, bare_post, node_post = results
    print()
    for name, node_result, bare_result in (
        ("GET ", node_get, bare_get),
        ("POST", node_post, bare_post),
    ):
        print(
            f"{name} node/bare: throughput {node_result.rate / bare_result.rate:.3f}x,"
            f" p99 {node_result.percentile(0.99) / bare_result.percentile(0.99):.1f}x"
            f" ({node_result.rate:.0f} vs {bare_result.rate:.0f} req/s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--serve", nargs=2, metavar=("DATABASE_URL", "DATA_DIR"))
    options = parser.parse_args()
    if options.serve:
        serve(*options.serve)
        return

    from tests.support import fresh_database

    with fresh_database() as url, tempfile.TemporaryDirectory() as data_dir:
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", url, data_dir],
            stdout=subprocess.PIPE,
        )
        try:
            assert server.stdout is not None
            ports = json.loads(server.stdout.readline() or b"{}")
            if not ports:
                log = (Path(data_dir) / "node.log").read_text(errors="replace")
                raise SystemExit(f"the server did not start:\n{log[-3000:]}")
            asyncio.run(
                bench(
                    ports["node_port"],
                    ports["bare_port"],
                    options.seconds,
                    options.concurrency,
                )
            )
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


if __name__ == "__main__":
    main()

"""Measure git smart HTTP through the node against git's own servers.

Run: ``python bench/bench_git.py [SOURCE] [--runs N] [--parallel P]``.

SOURCE is a local repository (path) or a URL git can clone from, for
instance a mirror of Twisted's history; without one, a repository with a
pack of about 90 MB is generated deterministically with ``git
fast-import`` (text files that change from commit to commit, and some
incompressible binary blobs).  The script then:

1. starts a node as a real ``twistd -n gitlawb`` process on a fresh
   database on the test PostgreSQL server (``GITLAWB_TEST_DATABASE_URL``),
   creates a repository there, and pushes the source's branches and tags to
   it through L{tests.signing_proxy.SigningProxy}, sampling the node's RSS
   before, during and after the push;
2. starts ``git http-backend`` behind nginx and fcgiwrap (Debian packages
   ``nginx`` and ``fcgiwrap``), configured here in a temporary directory, on
   loopback, as the current user, serving the very repository the node
   holds;
3. times the same push into an empty repository through http-backend
   (behind the same proxy, unsigned) and with ``file://``, for reference;
4. clones that repository (``git clone --bare``) through the node, through
   http-backend and with ``git clone file://``, ``--runs`` times each in
   turn, and prints the best MiB/s of each and the ratio node/http-backend;
5. sends the same clone's ``git-upload-pack`` request with curl (and to
   ``git upload-pack`` directly for the file row), discarding the answer:
   the servers' share of a clone without the client's ``index-pack``, which
   dominates a clone's time on a small machine;
6. runs ``--parallel`` clones at once through the node, then through
   http-backend, and prints errors and total time for each.

The node's CPU seconds per clone are printed too: unlike the rates they
hardly depend on what else the machine is doing.  Everything started is
stopped at the end.  About five minutes with the generated repository.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.signing_proxy import SigningProxy  # noqa: E402
from tests.support import (  # noqa: E402
    Agent,
    NodeProcess,
    free_port,
    fresh_database,
    node_env,
)

MIB = 1024 * 1024
NODE = "node (twistd gitlawb)"
BACKEND = "http-backend (nginx)"
HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"

# The environment of every git this script runs: no user or system config,
# no proxy between us and loopback.
GIT_ENV = {
    **{
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GIT_") and not k.lower().endswith("_proxy")
    },
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",
    "LC_ALL": "C",
}


def git(*args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def cpu_seconds(pid: int) -> float:
    """
    User plus system CPU time a process has used so far.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pack_bytes(repo: Path) -> int:
    return sum(p.stat().st_size for p in (repo / "objects" / "pack").glob("*.pack"))


# -- The repository ----------------------------------------------------------------


def generate_repository(path: Path, seed: int = 90) -> None:
    """
    Make a bare repository whose pack is about 90 MB, the same on every run:
    3000 commits, each adding a text file of 300 pseudo-random lines and
    rewriting a few lines of three older ones, and every 40th adding an
    820 kB binary blob.  Commit times are fixed, so the commit ids are too.
    """
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz_"
    vocabulary = [
        "".join(rng.choice(letters) for _ in range(rng.randint(2, 10)))
        for _ in range(4000)
    ]

    def text(lines: int) -> bytes:
        out = [
            " " * (4 * rng.randint(0, 3))
            + " ".join(rng.choices(vocabulary, k=rng.randint(3, 12)))
            for _ in range(lines)
        ]
        return ("\n".join(out) + "\n").encode()

    git("init", "-q", "--bare", "-b", "main", str(path))
    importer = subprocess.Popen(
        ["git", "fast-import", "--quiet"],
        cwd=path,
        env=GIT_ENV,
        stdin=subprocess.PIPE,
    )
    assert importer.stdin is not None
    write = importer.stdin.write
    texts: dict[str, bytes] = {}
    blobs: dict[str, bytes] = {}
    for number in range(3000):
        changed = []
        name = f"src/m{number % 97:02d}/file{number:05d}.txt"
        texts[name] = text(300)
        changed.append(name)
        if len(texts) > 3:
            for older in rng.sample(sorted(texts), 3):
                lines = texts[older].split(b"\n")
                for _ in range(5):
                    lines[rng.randrange(len(lines))] = text(1).rstrip(b"\n")
                texts[older] = b"\n".join(lines)
                changed.append(older)
        if number % 40 == 0:
            name = f"assets/blob{number:05d}.bin"
            blobs[name] = rng.randbytes(820_000)
            changed.append(name)
        message = f"commit {number}\n\n{text(3).decode()}".encode()
        when = 1_600_000_000 + number * 600
        write(b"commit refs/heads/main\n")
        write(f"committer Bench <bench@example.invalid> {when} +0000\n".encode())
        write(b"data %d\n%s\n" % (len(message), message))
        for name in changed:
            data = texts.get(name) or blobs[name]
            write(b"M 100644 inline " + name.encode() + b"\n")
            write(b"data %d\n%s\n" % (len(data), data))
        if number % 500 == 499:
            write(
                f"reset refs/tags/v{number // 500}\nfrom refs/heads/main\n\n".encode()
            )
    importer.stdin.close()
    if importer.wait() != 0:
        raise SystemExit("git fast-import failed")
    # One pack with real deltas, as a repository that has been gc'ed has.
    git("repack", "-a", "-d", "-f", "-q", cwd=path)


def prepare_source(source: str | None, work: Path) -> Path:
    path = work / "source.git"
    started = time.perf_counter()
    if source is None:
        generate_repository(path)
        what = "generated"
    else:
        git("clone", "-q", "--bare", source, str(path))
        what = f"cloned from {source}"
    heads = git("for-each-ref", "--format=x", "refs/heads", "refs/tags", cwd=path)
    print(
        f"source: {what} in {time.perf_counter() - started:.1f} s,"
        f" pack {pack_bytes(path) / MIB:.1f} MiB, {len(heads.split())} refs"
    )
    return path


# -- The node ------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class RssSampler:
    """
    Samples a process's RSS every C{interval} seconds in a thread.
    """

    pid: int
    interval: float = 0.02
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> RssSampler:
        self.peak = rss_bytes(self.pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))


@contextmanager
def running_node(work: Path) -> Iterator[NodeProcess]:
    with fresh_database() as url:
        data_dir = work / "node"
        data_dir.mkdir()
        port = free_port()
        env = node_env(data_dir, port, url)
        node = NodeProcess(data_dir, port, env, work / "node.log")
        node.start(wait=60)
        try:
            yield node
        finally:
            node.stop()


def push_to_node(node: NodeProcess, source: Path) -> Path:
    """
    Create C{bench} on the node and push the source's branches and tags to
    it; print the node's RSS around the push.

    @return: the repository's directory on the node.
    """
    owner = Agent()
    answer = owner.call(node, "POST", "/api/v1/repos", {"name": "bench"})
    if answer.status != 201:
        raise SystemExit(f"creating the repository failed: {answer}")
    short = owner.did.rsplit(":", 1)[1]
    assert node.process is not None
    pid = node.process.pid
    before = rss_bytes(pid)
    with SigningProxy(node.url, owner.key) as proxy, RssSampler(pid) as sampler:
        started = time.perf_counter()
        git(
            "push",
            "-q",
            f"{proxy.url}/{short}/bench.git",
            "refs/heads/*:refs/heads/*",
            "refs/tags/*:refs/tags/*",
            cwd=source,
        )
        elapsed = time.perf_counter() - started
    time.sleep(0.5)
    after = rss_bytes(pid)
    path = node.data_dir / "repos" / short / "bench.git"
    size = pack_bytes(path)
    print(
        f"push through the node: {size / MIB:.1f} MiB in {elapsed:.1f} s"
        f" ({size / MIB / elapsed:.1f} MiB/s)"
    )
    print(
        f"node RSS: before {before / MIB:.1f} MiB, peak during push"
        f" {sampler.peak / MIB:.1f} MiB (+{(sampler.peak - before) / MIB:.1f}),"
        f" after {after / MIB:.1f} MiB (+{(after - before) / MIB:.1f});"
        " goal: growth < 64 MiB"
    )
    return path


def push_baselines(source: Path, served: Path, backend: str) -> None:
    """
    Time the same push into an empty repository through http-backend (behind
    the same L{SigningProxy}, not signing) and with C{file://}.
    """
    for label in (BACKEND, "file://"):
        target = served / "baseline.git"
        git("init", "-q", "--bare", str(target))
        git("config", "http.receivepack", "true", cwd=target)
        with SigningProxy(backend, None) as proxy:
            url = (
                f"{proxy.url}/baseline.git"
                if label != "file://"
                else f"file://{target}"
            )
            started = time.perf_counter()
            git(
                "push",
                "-q",
                url,
                "refs/heads/*:refs/heads/*",
                "refs/tags/*:refs/tags/*",
                cwd=source,
            )
            elapsed = time.perf_counter() - started
        size = pack_bytes(target)
        print(
            f"push through {label}: {size / MIB:.1f} MiB in {elapsed:.1f} s"
            f" ({size / MIB / elapsed:.1f} MiB/s)"
        )
        shutil.rmtree(target)


# -- git http-backend behind nginx and fcgiwrap -------------------------------------


SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def ensure_packages() -> tuple[str, str]:
    """
    Install nginx and fcgiwrap when they are missing (as root, with apt).

    @return: the paths of the two programs.
    """
    missing = [
        binary
        for binary in ("nginx", "fcgiwrap")
        if not shutil.which(binary, path=SBIN_PATH)
    ]
    if not missing:
        return programs()
    if os.geteuid() != 0:
        raise SystemExit(f"missing: {' '.join(missing)} (apt-get install them)")
    print(f"installing {' '.join(missing)} ...", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], stdout=subprocess.DEVNULL, check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *missing],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        stdout=subprocess.DEVNULL,
        check=True,
    )
    return programs()


def programs() -> tuple[str, str]:
    nginx = shutil.which("nginx", path=SBIN_PATH)
    fcgiwrap = shutil.which("fcgiwrap", path=SBIN_PATH)
    if nginx is None or fcgiwrap is None:
        raise SystemExit("nginx or fcgiwrap is still missing")
    return nginx, fcgiwrap


NGINX_CONF = """\
{user}
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    fastcgi_temp_path {dir}/fastcgi;
    proxy_temp_path {dir}/proxy;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME {backend};
            fastcgi_param PATH_INFO $uri;
            fastcgi_param GIT_PROJECT_ROOT {root};
            fastcgi_param GIT_HTTP_EXPORT_ALL "";
            fastcgi_param GIT_CONFIG_NOSYSTEM 1;
            fastcgi_param HOME {dir};
            fastcgi_pass unix:{dir}/fcgiwrap.sock;
            fastcgi_read_timeout 600s;
        }}
    }}
}}
"""


@contextmanager
def http_backend(root: Path, work: Path, children: int) -> Iterator[str]:
    """
    Serve C{root} with C{git http-backend} behind nginx and fcgiwrap on a
    loopback port; yield the base URL.
    """
    nginx_path, fcgiwrap_path = ensure_packages()
    directory = work / "nginx"
    directory.mkdir()
    port = free_port()
    user = ""
    if os.geteuid() == 0:
        # nginx would otherwise run its workers as nobody.
        name = pwd.getpwuid(os.getuid()).pw_name
        user = f"user {name} {grp.getgrgid(os.getgid()).gr_name};"
    config = directory / "nginx.conf"
    config.write_text(
        NGINX_CONF.format(
            user=user, dir=directory, port=port, root=root, backend=HTTP_BACKEND
        )
    )
    log = (directory / "processes.log").open("ab")
    with ExitStack() as stack:
        socket_path = directory / "fcgiwrap.sock"
        fcgiwrap = subprocess.Popen(
            [fcgiwrap_path, "-c", str(children), "-s", f"unix:{socket_path}"],
            env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
            stdout=log,
            stderr=log,
            # Its own group: the children it forks outlive a SIGTERM to it.
            start_new_session=True,
        )
        stack.callback(stop_group, fcgiwrap)
        wait_for(socket_path.exists, "fcgiwrap's socket")
        nginx = subprocess.Popen(
            [nginx_path, "-p", str(directory), "-c", str(config)],
            stdout=log,
            stderr=log,
        )
        stack.callback(stop_process, nginx)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: port_open(port), "nginx")
        yield url


def port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(check: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up")
        time.sleep(0.02)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """
    Stop C{process} and the children of its own process group.
    """
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    stop_process(process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- Clones --------------------------------------------------------------------------


def clone(url: str, target: Path) -> tuple[float, int, str]:
    """
    C{git clone --bare url target}; return the seconds it took, the size of
    the pack received, and git's stderr when it failed ("" on success).
    """
    started = time.perf_counter()
    result = subprocess.run(
        ["git", "clone", "-q", "--bare", url, str(target)],
        env=GIT_ENV,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        return elapsed, 0, result.stderr.strip() or f"exit {result.returncode}"
    size = pack_bytes(target)
    shutil.rmtree(target)
    return elapsed, size, ""


def clone_rows(
    urls: dict[str, str], work: Path, runs: int, node_pid: int
) -> dict[str, float]:
    """
    Clone each URL C{runs} times, in turn; print and return each one's best
    MiB/s.
    """
    times: dict[str, list[float]] = {label: [] for label in urls}
    sizes: dict[str, int] = {}
    node_cpu = 0.0
    for _ in range(runs):
        for label, url in urls.items():
            before = cpu_seconds(node_pid)
            elapsed, size, error = clone(url, work / "clone.git")
            if error:
                raise SystemExit(f"clone through {label} failed: {error}")
            if label == NODE:
                node_cpu += cpu_seconds(node_pid) - before
            times[label].append(elapsed)
            sizes[label] = size
    print(f"\nclone --bare, best and median of {runs}")
    rates = report(times, sizes)
    print(f"node CPU per clone: {node_cpu / runs:.2f} s")
    return rates


def pkt(line: str) -> bytes:
    data = line.encode()
    return b"%04x" % (len(data) + 4) + data


def fetch_request(repo: Path) -> bytes:
    """
    The protocol v2 C{fetch} request a clone of C{repo} sends: every branch
    and tag wanted, no progress.
    """
    tips = set(git("for-each-ref", "--format=%(objectname)", cwd=repo).split())
    return b"".join(
        [
            pkt("command=fetch\n"),
            pkt("agent=git/bench\n"),
            pkt("object-format=sha1\n"),
            b"0001",
            pkt("ofs-delta\n"),
            pkt("no-progress\n"),
            *(pkt(f"want {tip}\n") for tip in sorted(tips)),
            pkt("done\n"),
            b"0000",
        ]
    )


def upload_pack_rows(
    urls: dict[str, str], repo: Path, work: Path, runs: int, node_pid: int
) -> dict[str, float]:
    """
    Send one clone's C{git-upload-pack} request and discard the answer
    (curl for HTTP, C{git upload-pack --stateless-rpc} for the file row):
    the servers' share of a clone, without the client's C{index-pack}.
    Print and return each one's best MiB/s.
    """
    body = work / "fetch-request"
    body.write_bytes(fetch_request(repo))
    times: dict[str, list[float]] = {label: [] for label in urls}
    sizes: dict[str, int] = {}
    node_cpu = 0.0
    for _ in range(runs):
        for label, url in urls.items():
            before = cpu_seconds(node_pid)
            started = time.perf_counter()
            if url.startswith("file://"):
                with body.open("rb") as stdin:
                    served = subprocess.run(
                        ["git", "upload-pack", "--stateless-rpc", str(repo)],
                        env={**GIT_ENV, "GIT_PROTOCOL": "version=2"},
                        stdin=stdin,
                        stdout=subprocess.PIPE,
                        check=True,
                    )
                size = len(served.stdout)
            else:
                done = subprocess.run(
                    [
                        "curl", "-sS", "--fail", "-o", "/dev/null",
                        "-w", "%{size_download}",
                        "-H", "Git-Protocol: version=2",
                        "-H", "Content-Type: application/x-git-upload-pack-request",
                        "--data-binary", f"@{body}",
                        f"{url}/git-upload-pack",
                    ],
                    env=GIT_ENV,
                    capture_output=True,
                    text=True,
                )  # fmt: skip
                if done.returncode != 0:
                    raise SystemExit(f"upload-pack through {label}: {done.stderr}")
                size = int(done.stdout)
            times[label].append(time.perf_counter() - started)
            if label == NODE:
                node_cpu += cpu_seconds(node_pid) - before
            sizes[label] = size
    print(f"\nupload-pack response only (no index-pack), best and median of {runs}")
    rates = report(times, sizes)
    print(f"node CPU per response: {node_cpu / runs:.2f} s")
    return rates


def report(times: dict[str, list[float]], sizes: dict[str, int]) -> dict[str, float]:
    print(f"{'through':<28} {'MiB':>9} {'best s':>8} {'median s':>9} {'MiB/s':>8}")
    rates = {}
    for label, seconds in times.items():
        best = min(seconds)
        median = sorted(seconds)[len(seconds) // 2]
        rates[label] = sizes[label] / MIB / best
        print(
            f"{label:<28} {sizes[label] / MIB:>9.1f} {best:>8.2f} {median:>9.2f}"
            f" {rates[label]:>8.1f}"
        )
    return rates


def parallel_clones(label: str, url: str, work: Path, count: int) -> None:
    """
    Start C{count} clones of C{url} at once; print errors and total time.
    """
    targets = [work / f"parallel-{n}.git" for n in range(count)]
    results: list[tuple[float, int, str]] = [(0.0, 0, "")] * count

    def one(n: int) -> None:
        results[n] = clone(url, targets[n])

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    errors = [error for _, _, error in results if error]
    total = sum(size for _, size, _ in results)
    slowest = max(seconds for seconds, _, _ in results)
    print(
        f"{label:<28} {count:>3} clones {len(errors):>3} errors"
        f" {elapsed:>7.1f} s total, slowest {slowest:.1f} s,"
        f" {total / MIB / elapsed:>6.1f} MiB/s aggregate"
    )
    for error in sorted(set(errors))[:3]:
        print(f"    error: {error[:300]}")
    for target in targets:
        shutil.rmtree(target, ignore_errors=True)


# -- Main ----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "source", nargs="?", help="repository path or URL (default: generate one)"
    )
    parser.add_argument("--runs", type=int, default=3, help="clones per row")
    parser.add_argument("--parallel", type=int, default=32, help="parallel clones")
    parser.add_argument(
        "--no-parallel-baseline",
        action="store_true",
        help="run the parallel clones through the node only",
    )
    options = parser.parse_args()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average at the start: {load} ({os.cpu_count()} CPUs)")

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        source = prepare_source(options.source, work)
        node = stack.enter_context(running_node(work))

        # http-backend serves the node's own repositories (under node/) and a
        # baseline repository to push to.
        served = work / "served"
        served.mkdir()
        (served / "node").symlink_to(node.data_dir / "repos")
        backend = stack.enter_context(
            http_backend(served, work, max(4, options.parallel))
        )

        repo = push_to_node(node, source)
        push_baselines(source, served, backend)
        relative = repo.relative_to(node.data_dir / "repos")
        urls = {
            NODE: f"{node.url}/{relative}",
            BACKEND: f"{backend}/node/{relative}",
            "file://": f"file://{repo}",
        }
        # Warm the page cache and both servers once, unmeasured.
        for url in urls.values():
            clone(url, work / "clone.git")
        assert node.process is not None
        node_pid = node.process.pid
        rates = clone_rows(urls, work, options.runs, node_pid)
        node_rate, backend_rate, file_rate = rates.values()
        print(
            f"\nnode / http-backend: {node_rate / backend_rate:.3f} (goal >= 0.9);"
            f" node / file://: {node_rate / file_rate:.3f}"
        )

        raw = upload_pack_rows(urls, repo, work, options.runs, node_pid)
        node_raw, backend_raw, file_raw = raw.values()
        print(
            f"\nnode / http-backend: {node_raw / backend_raw:.3f};"
            f" node / file: {node_raw / file_raw:.3f}"
        )

        print(f"\n{options.parallel} parallel clones")
        parallel_clones(NODE, urls[NODE], work, options.parallel)
        if not options.no_parallel_baseline:
            parallel_clones(BACKEND, urls[BACKEND], work, options.parallel)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"\nload average at the end: {load} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()

"""Measure replication between two real node processes on loopback.

Run: ``python bench/bench_replication.py [pushes] [idle_seconds]`` (20 and 10
by default).  Each node is a real ``twistd -n gitlawb`` process with its own
fresh database on the test PostgreSQL server (``GITLAWB_TEST_DATABASE_URL``).

Two runs, each with a new pair of nodes A and B:

- gossip: both swarms on (QUIC on loopback, B dials A); B knows A's HTTP URL
  from an announce signed with A's key, and A knows nothing of B over HTTP,
  so gossip is the only way B hears of a push;
- notify: no swarm (``GITLAWB_P2P_PORT=0``); B bootstraps to A over HTTP and
  A tells B of each push with a signed ``POST /api/v1/sync/notify``.

In each run it pushes one new commit to A, C{pushes} times, one after the
other (plain ``git push`` through the signing proxy), and times how long
until B serves the new commit (``git ls-remote`` of B, polled): the push
itself, the lag after the push returned, and the total, as median and worst.
The first push includes creating the mirror.  Then, with both nodes idle,
it reads each node process's CPU time from ``/proc/<pid>/stat`` over
C{idle_seconds}, and its threads' from ``/proc/<pid>/task``: the main
(reactor) thread and the others, which in the gossip run include the swarm's
trio thread (Python 3.11 does not name OS threads, so it is not told apart);
the notify run is the same node without a swarm.  A table at the end sums
up.  About a minute and a half.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.integration.test_peers_sync import (  # noqa: E402
    create_repo,
    git,
    node_did,
    peer_dids,
    refs,
    wait_for,
)
from tests.integration.test_replication import (  # noqa: E402
    announce,
    free_p2p_port,
    quic_address,
    wait_meshed,
)
from tests.signing_proxy import SigningProxy  # noqa: E402
from tests.support import (  # noqa: E402
    Agent,
    NodeProcess,
    free_port,
    fresh_database,
    node_env,
    server_reachable,
)

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    name: str
    push: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    idle_cpu: dict[str, tuple[float, float, float]] = field(default_factory=dict)


def cpu_seconds(stat_path: str) -> float:
    """User + system CPU time in a /proc .../stat file."""
    with open(stat_path) as f:
        # The command name may hold spaces; the fields after it do not.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def threads(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process, by thread id."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            found[int(tid)] = cpu_seconds(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
    return found


def start(stack: ExitStack, work: Path, name: str, **settings: str) -> NodeProcess:
    database_url = stack.enter_context(fresh_database())
    data_dir = work / name
    data_dir.mkdir()
    port = free_port()
    env = node_env(data_dir, port, database_url, **settings)
    node = NodeProcess(data_dir, port, env, work / f"{name}.log")
    stack.callback(node.stop)
    return node.start()


def serves(mirror: str, sha: str, timeout: float = 60.0) -> float:
    """
    Poll B (``git ls-remote``, about 10 ms apart) until its main is C{sha}.

    @return: the monotonic time it was first seen.
    """
    deadline = time.monotonic() + timeout
    while refs(mirror).get("refs/heads/main") != sha:
        if time.monotonic() > deadline:
            raise AssertionError(f"B did not serve {sha} within {timeout}s")
        time.sleep(0.01)
    return time.monotonic()


def measure(run: Run, a: NodeProcess, b: NodeProcess, work: Path, pushes: int) -> None:
    owner = Agent()
    short = owner.did.rsplit(":", 1)[1]
    create_repo(a, owner, "bench")
    checkout = work / f"{run.name}-work"
    git("init", "-q", "-b", "main", str(checkout))
    mirror = f"{b.url}/{short}/bench.git"
    with SigningProxy(a.url, owner.key) as proxy:
        target = f"{proxy.url}/{short}/bench.git"
        for n in range(pushes):
            (checkout / f"file-{n}").write_text(f"{n}\n")
            git("add", ".", cwd=checkout)
            git("commit", "-q", "-m", f"commit {n}", cwd=checkout)
            sha = git("rev-parse", "HEAD", cwd=checkout).strip()
            started = time.monotonic()
            git("push", "-q", target, "main", cwd=checkout)
            pushed = time.monotonic()
            served = serves(mirror, sha)
            run.push.append(pushed - started)
            run.lag.append(served - pushed)
            run.total.append(served - started)
    clone = work / f"{run.name}-clone"
    git("clone", "-q", mirror, str(clone))
    assert git("rev-parse", "HEAD", cwd=clone).strip() == sha
    assert refs(mirror) == refs(f"{a.url}/{short}/bench.git")


def idle(run: Run, nodes: dict[str, NodeProcess], seconds: float) -> None:
    """
    Record each node's idle CPU over C{seconds}, in percent of a core: the
    whole process, its main (reactor) thread, and its other threads (the
    swarm's trio thread among them, when it runs).
    """
    pids = {name: node.process.pid for name, node in nodes.items()}  # type: ignore[union-attr]
    # Let the last sync, replica registration and relay rows settle.
    time.sleep(2)
    before = {name: threads(pid) for name, pid in pids.items()}
    whole = {name: cpu_seconds(f"/proc/{pid}/stat") for name, pid in pids.items()}
    time.sleep(seconds)
    for name, pid in pids.items():
        after = threads(pid)
        used = {t: after[t] - before[name].get(t, 0.0) for t in after}
        main = used.get(pid, 0.0)
        total = cpu_seconds(f"/proc/{pid}/stat") - whole[name]
        run.idle_cpu[name] = (
            100 * total / seconds,
            100 * main / seconds,
            100 * (sum(used.values()) - main) / seconds,
        )


def gossip_run(work: Path, pushes: int, idle_seconds: float) -> Run:
    run = Run("gossip")
    with ExitStack() as stack:
        a = start(
            stack,
            work,
            "gossip-a",
            GITLAWB_P2P_PORT=str(free_p2p_port()),
            GITLAWB_P2P_HOST="127.0.0.1",
        )
        b = start(
            stack,
            work,
            "gossip-b",
            GITLAWB_P2P_PORT=str(free_p2p_port()),
            GITLAWB_P2P_HOST="127.0.0.1",
            GITLAWB_P2P_BOOTSTRAP=quic_address(a),
        )
        announce(a, b)
        wait_meshed(a, b)
        measure(run, a, b, work, pushes)
        assert peer_dids(a) == set(), "A must not notify B over HTTP"
        idle(run, {"A": a, "B": b}, idle_seconds)
    return run


def notify_run(work: Path, pushes: int, idle_seconds: float) -> Run:
    run = Run("notify")
    with ExitStack() as stack:
        a = start(stack, work, "notify-a")
        b = start(stack, work, "notify-b", GITLAWB_BOOTSTRAP_PEERS=a.url)
        wait_for(lambda: node_did(b) in peer_dids(a), what="A to know B")
        measure(run, a, b, work, pushes)
        idle(run, {"A": a, "B": b}, idle_seconds)
    return run


def ms(values: list[float]) -> str:
    median, worst = statistics.median(values), max(values)
    return f"{1000 * median:5.0f} / {1000 * worst:5.0f}"


def cpu(figures: tuple[float, float, float]) -> str:
    total, main, others = figures
    return f"{total:4.1f}% ({main:.1f} + {others:.1f})"


def main() -> None:
    pushes = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    idle_seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
    if not server_reachable():
        raise SystemExit("the test PostgreSQL server is not reachable")
    os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/runtime-{os.getuid()}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-replication-") as tmp:
        work = Path(tmp)
        runs = [
            gossip_run(work, pushes, idle_seconds),
            notify_run(work, pushes, idle_seconds),
        ]
    print(
        f"\nreplication A -> B on loopback: {pushes} pushes per run, one at a"
        " time; median / worst in ms"
    )
    print(
        f"idle CPU over {idle_seconds:.0f}s in % of a core: whole process"
        " (main thread + other threads); one clock tick is"
        f" {100 / TICKS / idle_seconds:.1f}%\n"
    )
    header = (
        f"{'run':<7} {'git push':>13} {'push -> B':>13} {'B after push':>13}"
        f"   {'idle CPU A':<21} {'idle CPU B':<21}"
    )
    print(header)
    print("-" * len(header))
    for run in runs:
        print(
            f"{run.name:<7} {ms(run.push):>13} {ms(run.total):>13}"
            f" {ms(run.lag):>13}   {cpu(run.idle_cpu['A']):<21}"
            f" {cpu(run.idle_cpu['B']):<21}"
        )
    print(
        "\ngit push: the push alone; push -> B: from the push's start until B"
        " serves the commit;\nB after push: from the push's return until B"
        f" serves it.  (took {time.monotonic() - started:.0f}s)"
    )


if __name__ == "__main__":
    main()

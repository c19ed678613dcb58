"""
Prometheus metrics (PROTOCOL.md section 11) of a real node: what a scrape of
C{GITLAWB_METRICS_ADDR} says after real pushes, clones, refused signatures,
webhook deliveries and syncs; the listener's life; and the alert rules
shipped in C{contrib/}.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_git_http import (
    Repo,
    add_commits,
    create_repo,
    git,
    wait_for,
    work_repo,
)
from tests.integration.test_webhooks import Receiver
from tests.signing_proxy import SigningProxy
from tests.support import REPO_ROOT, Agent, NodeProcess, free_port, node_env, request

pytestmark = pytest.mark.integration

StartNode = Callable[..., NodeProcess]

#: One sample: its name and its labels, sorted.
Key = tuple[str, tuple[tuple[str, str], ...]]

# Fast retries, so that a delivery's attempts follow one another at once.
FAST_RETRIES = {
    "GITLAWB_WEBHOOK_RETRY_BASE_SECS": "0.2",
    "GITLAWB_WEBHOOK_RETRY_MAX_SECS": "0.5",
}


# -- helpers -------------------------------------------------------------------


def metrics_settings() -> dict[str, str]:
    """Settings that give a node a metrics listener on a free loopback port."""
    return {"GITLAWB_METRICS_ADDR": f"127.0.0.1:{free_port()}"}


def metrics_url(node: NodeProcess) -> str:
    return f"http://{node.env['GITLAWB_METRICS_ADDR']}/metrics"


def scrape(node: NodeProcess) -> dict[Key, float]:
    """
    Every sample the node's metrics listener serves, parsed by
    prometheus-client's own parser.
    """
    answer = request("GET", metrics_url(node))
    assert answer.status == 200, answer
    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Key, float], name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def label_values(samples: dict[Key, float], name: str, label: str) -> set[str]:
    return {
        dict(labels)[label]
        for sample, labels in samples
        if sample == name and label in dict(labels)
    }


@pytest.fixture
def receivers() -> Iterator[Callable[[list[int]], Receiver]]:
    made: list[Receiver] = []

    def make(answers: list[int]) -> Receiver:
        receiver = Receiver(answers)
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.close()


def create_hook(repo: Repo, url: str) -> None:
    target = f"/api/v1/repos/{repo.short}/{repo.name}/hooks"
    answer = repo.owner.call(repo.node, "POST", target, {"url": url})
    assert answer.status == 201, answer


def push(repo: Repo, work: Path) -> None:
    with SigningProxy(repo.node.url, repo.owner.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", cwd=work)


def bad_signature(agent: Agent, node: NodeProcess, target: str) -> int:
    """
    Send a signed POST to C{target} whose signature no longer matches (one
    byte of it changed); return the status.
    """
    body = b'{"url": "http://127.0.0.1:9/hook"}'
    headers = agent.signed_headers("POST", target, body)
    label, _, value = headers["Signature"].partition("=:")
    flipped = ("B" if value[0] == "A" else "A") + value[1:]
    headers["Signature"] = f"{label}=:{flipped}"
    headers["Content-Type"] = "application/json"
    return request("POST", node.url + target, body, headers).status


def delivered(node: NodeProcess) -> bool:
    return value(scrape(node), "gitlawb_webhook_deliveries_total", result="ok") >= 1


# -- counters ----------------------------------------------------------------------


def test_one_push_clone_refusal_and_delivery_move_each_counter_once(
    start_node: StartNode,
    tmp_path: Path,
    receivers: Callable[[list[int]], Receiver],
) -> None:
    """After one push, one clone, one refused signature and one webhook
    delivery, each counter moved by exactly one, and the pack-size histogram
    counted the push and the clone."""
    node = start_node(**metrics_settings())
    agent = Agent()
    repo = create_repo(node, agent, "counted")
    create_hook(repo, receivers([200]).url)
    work = work_repo(tmp_path / "work")
    add_commits(work, 3, "a", size=4000)
    slug = f"{repo.short}/{repo.name}"
    hooks = f"/api/v1/repos/{repo.short}/{repo.name}/hooks"
    before = scrape(node)

    push(repo, work)
    git("clone", "-q", repo.url, str(tmp_path / "clone"))
    refused = bad_signature(agent, node, hooks)
    wait_for(lambda: delivered(node), what="the delivery to be counted")
    after = scrape(node)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert refused == 401
    assert moved("gitlawb_pushes_total", repo=slug) == 1
    assert moved("gitlawb_fetches_total", repo=slug) == 1
    assert (
        moved(
            "gitlawb_auth_failures_total",
            route="/api/v1/repos/{owner}/{repo}/hooks",
            reason="invalid_signature",
        )
        == 1
    )
    assert (
        sum(
            value(after, name, **dict(labels)) - value(before, name, **dict(labels))
            for name, labels in after
            if name == "gitlawb_auth_failures_total"
        )
        == 1
    )
    assert moved("gitlawb_webhook_deliveries_total", result="ok") == 1
    assert moved("gitlawb_webhook_deliveries_total", result="http_error") == 0
    assert moved("gitlawb_webhook_deliveries_total", result="network_error") == 0
    assert moved("gitlawb_pack_size_bytes_count") == 2
    assert moved("gitlawb_pack_size_bytes_sum") > 2 * 3 * 100
    assert value(after, "gitlawb_info", version=_version(after), did=_did(node)) == 1


def _version(samples: dict[Key, float]) -> str:
    return label_values(samples, "gitlawb_info", "version").pop()


def _did(node: NodeProcess) -> str:
    return str(request("GET", node.url + "/").json()["did"])


def test_webhook_counter_counts_every_attempt(
    start_node: StartNode,
    tmp_path: Path,
    receivers: Callable[[list[int]], Receiver],
) -> None:
    """A delivery answered 500, 500, then 200 counts two http_error attempts
    and one ok."""
    node = start_node(**metrics_settings(), **FAST_RETRIES)
    receiver = receivers([500, 500, 200])
    repo = create_repo(node, Agent(), "retried")
    create_hook(repo, receiver.url)
    work = work_repo(tmp_path / "work")
    add_commits(work, 1, "a")

    push(repo, work)
    wait_for(lambda: delivered(node), what="the third attempt to succeed")
    after = scrape(node)

    assert len(receiver.received) == 3
    assert value(after, "gitlawb_webhook_deliveries_total", result="http_error") == 2
    assert value(after, "gitlawb_webhook_deliveries_total", result="ok") == 1
    assert value(after, "gitlawb_webhook_deliveries_total", result="network_error") == 0


def test_sync_item_is_counted_on_the_mirroring_node(
    start_node: StartNode, tmp_path: Path
) -> None:
    """B, bootstrapped from A, mirrors a push to A and counts one sync item
    done (and none failed, rejected or deferred)."""
    a = start_node(name="a")
    b = start_node(name="b", GITLAWB_BOOTSTRAP_PEERS=a.url, **metrics_settings())
    a_did = _did(a)
    wait_for(
        lambda: any(
            p["did"] == a_did
            for p in request("GET", b.url + "/api/v1/peers").json()["peers"]
        ),
        what="B to know A",
    )
    wait_for(
        lambda: len(request("GET", a.url + "/api/v1/peers").json()["peers"]) == 1,
        what="A to know B",
    )
    before = scrape(b)
    owner = Agent()
    repo = create_repo(a, owner, "mirrored")
    work = work_repo(tmp_path / "work")
    tip = add_commits(work, 2, "a")

    push(repo, work)
    mirror = f"{b.url}/{repo.short}/{repo.name}.git"
    wait_for(
        lambda: tip in git("ls-remote", mirror, check=False).stdout,
        timeout=30,
        what="B's mirror",
    )
    wait_for(
        lambda: (
            value(scrape(b), "gitlawb_sync_queue_processed_total", status="done")
            > value(before, "gitlawb_sync_queue_processed_total", status="done")
        ),
        what="the sync to be counted",
    )
    time.sleep(1.0)  # anything counted twice would show by now
    after = scrape(b)

    for status, expected in [("done", 1), ("failed", 0), ("rejected", 0)]:
        moved = value(
            after, "gitlawb_sync_queue_processed_total", status=status
        ) - value(before, "gitlawb_sync_queue_processed_total", status=status)
        assert moved == expected, status
    assert value(after, "gitlawb_sync_queue_processed_total", status="deferred") == 0


def test_listing_refs_is_not_a_fetch(start_node: StartNode, tmp_path: Path) -> None:
    """A protocol v2 ls-refs, even of a branch whose name holds PACK, counts
    no fetch and no pack; a clone then counts one of each."""
    node = start_node(**metrics_settings())
    agent = Agent()
    repo = create_repo(node, agent, "listed")
    work = work_repo(tmp_path / "work")
    add_commits(work, 2, "a")
    git("branch", "PACKAGING", cwd=work)
    with SigningProxy(node.url, agent.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", "PACKAGING", cwd=work)
    slug = f"{repo.short}/{repo.name}"
    v2 = ("-c", "protocol.version=2")
    before = scrape(node)

    git(*v2, "ls-remote", repo.url)
    listed = scrape(node)
    git(*v2, "clone", "-q", repo.url, str(tmp_path / "clone"))
    cloned = scrape(node)

    def fetches(samples: dict[Key, float]) -> float:
        return value(samples, "gitlawb_fetches_total", repo=slug)

    def packs(samples: dict[Key, float]) -> float:
        return value(samples, "gitlawb_pack_size_bytes_count")

    assert (fetches(listed), packs(listed)) == (fetches(before), packs(before))
    assert fetches(cloned) - fetches(before) == 1
    assert packs(cloned) - packs(before) == 1


# -- labels --------------------------------------------------------------------------


def test_route_labels_are_templates(start_node: StartNode, tmp_path: Path) -> None:
    """Auth counters and request durations carry route templates: no DID,
    repository name or other part of a raw path appears in a label."""
    node = start_node(**metrics_settings())
    agent = Agent()
    repo = create_repo(node, agent, "secretname")
    work = work_repo(tmp_path / "work")
    add_commits(work, 1, "a")
    push(repo, work)
    bad_signature(agent, node, f"/api/v1/repos/{repo.short}/{repo.name}/hooks")
    bad_signature(agent, node, f"/api/v1/repos/{repo.short}/other-name/hooks")
    request("GET", f"{node.url}/api/v1/repos/{repo.short}/{repo.name}")
    request("GET", f"{node.url}/no/such/path/{repo.short}")
    request("GET", f"{node.url}/api/v1/agents/{agent.did}")
    request("GET", f"{node.url}/health")

    samples = scrape(node)
    routes = (
        label_values(samples, "gitlawb_auth_failures_total", "route")
        | label_values(samples, "gitlawb_auth_successes_total", "route")
        | label_values(samples, "gitlawb_http_request_duration_seconds_count", "route")
    )

    assert routes, samples
    for route in routes:
        assert repo.short not in route, route
        assert "secretname" not in route and "other-name" not in route, route
        assert "no/such" not in route, route
    assert label_values(samples, "gitlawb_auth_failures_total", "route") == {
        "/api/v1/repos/{owner}/{repo}/hooks"
    }
    durations = label_values(
        samples, "gitlawb_http_request_duration_seconds_count", "route"
    )
    assert {
        "/{owner}/{repo}/info/refs",
        "/{owner}/{repo}/git-receive-pack",
        "/api/v1/repos/{owner}/{repo}",
        "/api/v1/repos",
        "/api/v1/agents/{did}",
        "/health",
        "/ready",
    } <= durations
    # Only a path no route matched is counted as unmatched.
    assert (
        value(
            samples,
            "gitlawb_http_request_duration_seconds_count",
            route="unmatched",
            status="4xx",
        )
        == 1
    )


def test_repo_label_values_are_bounded(start_node: StartNode, tmp_path: Path) -> None:
    """With GITLAWB_METRICS_MAX_REPOS=2, pushes to three repositories make
    two repo series and one _other."""
    node = start_node(GITLAWB_METRICS_MAX_REPOS="2", **metrics_settings())
    agent = Agent()
    work = work_repo(tmp_path / "work")
    add_commits(work, 1, "a")

    for name in ("one", "two", "three"):
        push(create_repo(node, agent, name), work)
    repos = label_values(scrape(node), "gitlawb_pushes_total", "repo")

    assert len(repos) == 3
    assert "_other" in repos
    assert f"{agent.did.rsplit(':', 1)[1]}/three" not in repos


# -- the listener ----------------------------------------------------------------------


def test_public_port_does_not_serve_metrics(start_node: StartNode) -> None:
    """GET /metrics on the public port is 404; the metrics port serves it."""
    node = start_node(**metrics_settings())

    public = request("GET", node.url + "/metrics")
    private = request("GET", metrics_url(node))

    assert public.status == 404
    assert b"gitlawb" not in public.body.replace(b"gitlawb-node", b"")
    assert private.status == 200
    assert b"gitlawb_info{" in private.body


def test_metrics_listener_stops_with_the_node(start_node: StartNode) -> None:
    """Once the node has exited its metrics port refuses connections."""
    node = start_node(**metrics_settings())
    host, port = node.env["GITLAWB_METRICS_ADDR"].split(":")
    assert request("GET", metrics_url(node)).status == 200

    status = node.stop()

    assert status == -signal.SIGTERM
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=2).close()


def test_metrics_address_in_use_stops_start_up(tmp_path: Path) -> None:
    """A metrics address already in use stops the start with a non-zero
    status and a line naming GITLAWB_METRICS_ADDR."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        env = node_env(
            tmp_path / "data", free_port(), None, GITLAWB_METRICS_ADDR=address
        )
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "gitlawb",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )

    assert result.returncode != 0, result.stdout
    lines = [
        line for line in result.stdout.splitlines() if "GITLAWB_METRICS_ADDR" in line
    ]
    assert lines, result.stdout
    assert address in lines[0]
    assert "Traceback" not in result.stdout


# -- what contrib/ ships -----------------------------------------------------------


def test_alert_rules_pass_promtool() -> None:
    """promtool accepts contrib/prometheus/gitlawb-alerts.yml."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package: prometheus)")
    rules = REPO_ROOT / "contrib" / "prometheus" / "gitlawb-alerts.yml"

    result = subprocess.run(
        [promtool, "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr

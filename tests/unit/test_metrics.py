"""
Unit tests for the node's metrics (PROTOCOL.md section 11): the families and
their labels (L{gitlawb.metrics}), the listener (L{gitlawb.metrics_site}),
and the Grafana dashboard and alert rules shipped in C{contrib/}.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor, RaisingMemoryReactor

from gitlawb import metrics
from gitlawb.metrics_site import MetricsSite
from tests.support import REPO_ROOT

#: PROTOCOL.md section 11: each family a node exports, and its type.
PROTOCOL_FAMILIES = {
    "gitlawb_info": "gauge",
    "gitlawb_pushes": "counter",
    "gitlawb_fetches": "counter",
    "gitlawb_auth_successes": "counter",
    "gitlawb_auth_failures": "counter",
    "gitlawb_sync_queue_processed": "counter",
    "gitlawb_webhook_deliveries": "counter",
    "gitlawb_pack_size_bytes": "histogram",
    "gitlawb_peers_connected": "gauge",
}

SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


@pytest.fixture(autouse=True)
def fresh_metrics() -> Iterator[None]:
    """
    Each test starts with no families and leaves the module as it found it.
    """
    saved = metrics._families, metrics._repos
    metrics.reset()
    yield
    metrics._families, metrics._repos = saved


def samples(families: metrics.Families) -> list[Any]:
    """Every sample of the node's registry, as a scrape would see it."""
    text = generate_latest(families.registry).decode()
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def series(families: metrics.Families, name: str) -> dict[str, float]:
    """The C{repo} label values of one sample name, with their values."""
    return {s.labels["repo"]: s.value for s in samples(families) if s.name == name}


# -- label bounds ----------------------------------------------------------------


def test_ten_thousand_repositories_stay_within_the_bound() -> None:
    """Pushes to 10,000 repositories make at most max_repos series plus one
    _other, and lose no count."""
    families = metrics.initialise("1.0", "did:key:z6Mk", max_repos=100)

    for index in range(10_000):
        metrics.record_push(f"owner/repo-{index}")
    pushes = series(families, "gitlawb_pushes_total")

    assert len(pushes) == 101
    assert pushes[metrics.OTHER_REPO] == 10_000 - 100
    assert sum(pushes.values()) == 10_000


def test_repository_seen_before_the_bound_keeps_its_label() -> None:
    """A repository counted before the bound was reached keeps its own series."""
    families = metrics.initialise("1.0", "did:key:z6Mk", max_repos=2)
    metrics.record_push("owner/early")
    metrics.record_push("owner/second")

    metrics.record_push("owner/late")
    metrics.record_push("owner/early")

    assert series(families, "gitlawb_pushes_total") == {
        "owner/early": 2,
        "owner/second": 1,
        metrics.OTHER_REPO: 1,
    }


def test_pushes_and_fetches_share_one_bound() -> None:
    """The bound counts repositories, not series per family: a repository
    first seen by a fetch after the bound goes to _other in both."""
    families = metrics.initialise("1.0", "did:key:z6Mk", max_repos=1)
    metrics.record_push("owner/first")

    metrics.record_fetch("owner/first")
    metrics.record_fetch("owner/second")

    assert series(families, "gitlawb_fetches_total") == {
        "owner/first": 1,
        metrics.OTHER_REPO: 1,
    }


def test_unknown_auth_reason_is_folded_into_other() -> None:
    """A failure reason that is not a protocol error code is counted as other."""
    families = metrics.initialise("1.0", "did:key:z6Mk")

    metrics.record_auth("/api/v1/repos", "invalid_signature")
    metrics.record_auth("/api/v1/repos", "something said by a client")
    metrics.record_auth("/api/v1/repos", None)

    failures = {
        s.labels["reason"]: s.value
        for s in samples(families)
        if s.name == "gitlawb_auth_failures_total"
    }
    assert failures == {"invalid_signature": 1, "other": 1}


def test_request_status_is_labelled_by_class() -> None:
    """Request durations are labelled 2xx, 4xx, 5xx, never the exact status."""
    families = metrics.initialise("1.0", "did:key:z6Mk")

    metrics.record_request("/api/v1/repos", 201, 0.01)
    metrics.record_request("/api/v1/repos", 204, 0.01)
    metrics.record_request("/api/v1/repos", 404, 0.01)

    counts = {
        s.labels["status"]: s.value
        for s in samples(families)
        if s.name == "gitlawb_http_request_duration_seconds_count"
    }
    assert counts == {"2xx": 2, "4xx": 1}


# -- the families ----------------------------------------------------------------


def test_families_and_types_are_the_protocol_ones() -> None:
    """A scrape carries every family of PROTOCOL.md section 11 with its type."""
    families = metrics.initialise("1.0", "did:key:z6Mk")
    metrics.record_push("o/r")
    metrics.record_fetch("o/r")
    metrics.record_auth("/r", None)
    metrics.record_auth("/r", "forbidden")
    metrics.record_sync("done")
    metrics.record_webhook("ok")

    text = generate_latest(families.registry).decode()
    types = {f.name: f.type for f in text_string_to_metric_families(text)}

    assert {name: types.get(name) for name in PROTOCOL_FAMILIES} == PROTOCOL_FAMILIES


def test_pack_size_buckets_are_the_protocol_ones() -> None:
    """The pack-size histogram has the buckets PROTOCOL.md names."""
    families = metrics.initialise("1.0", "did:key:z6Mk")

    metrics.record_pack_size(5000)
    bounds = [
        s.labels["le"]
        for s in samples(families)
        if s.name == "gitlawb_pack_size_bytes_bucket"
    ]

    expected = [1024, 64e3, 1e6, 16e6, 64e6, 256e6, 1024**3, 2 * 1024**3]
    assert [float(b) for b in bounds] == [*expected, float("inf")]


def test_recording_before_initialise_does_nothing() -> None:
    """Code that records before any node made the families neither fails nor
    creates them."""
    metrics.record_push("o/r")
    metrics.record_webhook("ok")
    metrics.set_shutdown_in_progress(True)

    assert metrics.families() is None


# -- the listener -------------------------------------------------------------------


def test_metrics_site_listens_on_its_own_address_and_stops() -> None:
    """The metrics listener binds the configured address and closes its port
    when it stops."""
    metrics.initialise("1.0", "did:key:z6Mk")
    reactor = MemoryReactor()
    site = MetricsSite(reactor, "127.0.0.1", 9191)

    site.startService()
    bound = reactor.tcpServers[0]
    stopped = site.stopService()

    assert (bound[0], bound[3]) == (9191, "127.0.0.1")
    assert stopped.called
    assert site.listening is None


def test_metrics_address_in_use_is_one_clear_line() -> None:
    """An address that cannot be bound stops start-up with a line naming
    GITLAWB_METRICS_ADDR."""
    metrics.initialise("1.0", "did:key:z6Mk")
    in_use = CannotListenError("127.0.0.1", 9191, OSError(98, "in use"))
    site = MetricsSite(RaisingMemoryReactor(listenException=in_use), "127.0.0.1", 9191)

    with pytest.raises(SystemExit) as stopped:
        site.privilegedStartService()

    assert "GITLAWB_METRICS_ADDR" in str(stopped.value)
    assert "127.0.0.1:9191" in str(stopped.value)


# -- contrib/ ---------------------------------------------------------------------


def exported_names() -> set[str]:
    """Every sample name a node can export."""
    families = metrics.initialise("1.0", "did:key:z6Mk")
    names = set()
    for family in families.registry.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES)
    return names


def test_grafana_dashboard_parses_and_uses_exported_metrics() -> None:
    """The Grafana dashboard is JSON whose queries name only metrics a node
    exports."""
    path = REPO_ROOT / "contrib" / "grafana" / "gitlawb-dashboard.json"

    dashboard = json.loads(path.read_text())
    queries = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    used = {n for q in queries for n in re.findall(r"gitlawb_[a-z_]+", q)}

    assert queries
    assert used - exported_names() == set()


def test_alert_rules_use_exported_metrics() -> None:
    """Every gitlawb metric the alert rules query is one a node exports."""
    path = REPO_ROOT / "contrib" / "prometheus" / "gitlawb-alerts.yml"

    used = set(re.findall(r"gitlawb_[a-z_]+", path.read_text()))

    assert used
    assert used - exported_names() == set()

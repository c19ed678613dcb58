"""
The node's Prometheus metrics (PROTOCOL.md section 11).

The families live in a registry of the node's own, not prometheus-client's
process-wide default, so two nodes in one test process do not collide.  Code
everywhere records through the module-level helpers; before L{initialise} has
run they do nothing, so tests that never start a node need no set-up.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Pack sizes: 1 KiB, 64 KB, 1 MB, 16 MB, 64 MB, 256 MB, 1 GiB, 2 GiB.
PACK_BUCKETS = (
    1024.0,
    64_000.0,
    1_000_000.0,
    16_000_000.0,
    64_000_000.0,
    256_000_000.0,
    float(1024**3),
    float(2 * 1024**3),
)

OTHER_REPO = "_other"

# Auth failure reasons are the protocol's error codes; anything else is folded
# into "other" so a label never carries free text.
AUTH_REASONS = frozenset(
    {
        "not_an_agent",
        "invalid_signature",
        "replayed_signature",
        "clock_skew",
        "incomplete_signature",
        "unsupported_algorithm",
        "unresolvable_did",
        "signing_string_error",
        "content_digest_mismatch",
        "unreadable_body",
        "forbidden",
    }
)


@dataclass
class Families:
    registry: CollectorRegistry
    info: Gauge
    pushes: Counter
    fetches: Counter
    auth_successes: Counter
    auth_failures: Counter
    sync_processed: Counter
    webhook_deliveries: Counter
    pack_size: Histogram
    peers_connected: Gauge
    request_duration: Histogram
    git_processes: Gauge
    sync_queue_depth: Gauge
    webhook_pending: Gauge
    db_connections_in_use: Gauge
    shutdown_in_progress: Gauge


class _RepoLabels:
    """
    Keeps the C{repo} label to at most C{limit} distinct values; the rest are
    counted under C{repo="_other"}.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def label(self, repo: str) -> str:
        if repo in self._seen:
            return repo
        if len(self._seen) >= self.limit:
            return OTHER_REPO
        self._seen.add(repo)
        return repo


_families: Families | None = None
_repos = _RepoLabels(500)


def initialise(version: str, did: str, max_repos: int = 500) -> Families:
    """
    Create the node's registry and families.  Calling it again returns the
    families already made.
    """
    global _families, _repos
    if _families is not None:
        return _families
    registry = CollectorRegistry(auto_describe=True)
    _repos = _RepoLabels(max_repos)
    families = Families(
        registry=registry,
        info=Gauge("gitlawb_info", "Node build and identity.", ["version", "did"],
                   registry=registry),
        pushes=Counter("gitlawb_pushes", "Pushes git accepted, by repository "
                       "(at most GITLAWB_METRICS_MAX_REPOS values, then _other).",
                       ["repo"], registry=registry),
        fetches=Counter("gitlawb_fetches", "Clones and fetches served, by "
                        "repository.", ["repo"], registry=registry),
        auth_successes=Counter("gitlawb_auth_successes", "Requests whose "
                               "signature verified, by route template.",
                               ["route"], registry=registry),
        auth_failures=Counter("gitlawb_auth_failures", "Requests refused by "
                              "signature checks, by route template and error "
                              "code.", ["route", "reason"], registry=registry),
        sync_processed=Counter("gitlawb_sync_queue_processed", "Sync queue items "
                               "handled, by outcome.", ["status"],
                               registry=registry),
        webhook_deliveries=Counter("gitlawb_webhook_deliveries", "Webhook "
                                   "delivery attempts, by result.", ["result"],
                                   registry=registry),
        pack_size=Histogram("gitlawb_pack_size_bytes", "Bytes of git data "
                            "transferred per request, both directions: the "
                            "request body git read for a push, the response "
                            "git wrote for a clone or fetch.",
                            buckets=PACK_BUCKETS, registry=registry),
        peers_connected=Gauge("gitlawb_peers_connected", "libp2p peers "
                              "connected.", registry=registry),
        request_duration=Histogram("gitlawb_http_request_duration_seconds",
                                   "HTTP request duration by route template and "
                                   "status class.", ["route", "status"],
                                   registry=registry),
        git_processes=Gauge("gitlawb_git_processes", "git children running, by "
                            "service.", ["service"], registry=registry),
        sync_queue_depth=Gauge("gitlawb_sync_queue_depth", "Sync queue rows by "
                               "status.", ["status"], registry=registry),
        webhook_pending=Gauge("gitlawb_webhook_deliveries_pending", "Webhook "
                              "deliveries not yet delivered or failed.",
                              registry=registry),
        db_connections_in_use=Gauge("gitlawb_db_connections_in_use", "Database "
                                    "pool connections in use.",
                                    registry=registry),
        shutdown_in_progress=Gauge("gitlawb_shutdown_in_progress", "1 while the "
                                   "node is draining for shutdown.",
                                   registry=registry),
    )  # fmt: skip
    families.info.labels(version=version, did=did).set(1)
    _families = families
    return families


def reset() -> None:
    """
    Forget the families (for tests that start several nodes in one process).
    """
    global _families
    _families = None


def families() -> Families | None:
    return _families


def repo_label(repo: str) -> str:
    return _repos.label(repo)


def record_push(repo: str) -> None:
    if _families is not None:
        _families.pushes.labels(repo=repo_label(repo)).inc()


def record_fetch(repo: str) -> None:
    if _families is not None:
        _families.fetches.labels(repo=repo_label(repo)).inc()


def record_pack_size(size: int) -> None:
    if _families is not None:
        _families.pack_size.observe(size)


def record_auth(route: str, reason: str | None) -> None:
    """
    Count one signature check on C{route} (a route template): a success when
    C{reason} is C{None}, else a failure with that error code.
    """
    if _families is None:
        return
    if reason is None:
        _families.auth_successes.labels(route=route).inc()
    else:
        if reason not in AUTH_REASONS:
            reason = "other"
        _families.auth_failures.labels(route=route, reason=reason).inc()


def record_sync(status: str) -> None:
    if _families is not None:
        _families.sync_processed.labels(status=status).inc()


def record_webhook(result: str) -> None:
    if _families is not None:
        _families.webhook_deliveries.labels(result=result).inc()


def record_request(route: str, status: int, seconds: float) -> None:
    if _families is not None:
        _families.request_duration.labels(
            route=route, status=f"{status // 100}xx"
        ).observe(seconds)


def git_process_started(service: str) -> None:
    if _families is not None:
        _families.git_processes.labels(service=service).inc()


def git_process_ended(service: str) -> None:
    if _families is not None:
        _families.git_processes.labels(service=service).dec()


def set_peers_connected(count: int) -> None:
    if _families is not None:
        _families.peers_connected.set(count)


def set_shutdown_in_progress(flag: bool) -> None:
    if _families is not None:
        _families.shutdown_in_progress.set(1 if flag else 0)

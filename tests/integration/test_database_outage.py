"""
The node while its database goes away and comes back.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from gitlawb.db.embedded import EmbeddedPostgres
from tests.support import NodeProcess, request


def wait_for_status(url: str, status: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        seen = request("GET", url).status
        if seen == status:
            return seen
        time.sleep(0.2)
    return seen


def test_database_outage_answers_503_then_recovers(
    start_node: Callable[..., NodeProcess],
) -> None:
    """Without its database the API answers 503 db_unavailable, and works again
    once the database is back, without a restart of the node."""
    node = start_node(embedded=True)
    cluster = node.data_dir / "postgres"
    assert request("GET", node.url + "/api/v1/stats").status == 200

    # The cluster is this test's (the node it started made it).  An immediate
    # stop ends every session without a checkpoint, as a crash would; a
    # SIGKILL of the postmaster would leave a zombie here, which pg_ctl takes
    # for a running server when nothing reaps it.
    embedded = EmbeddedPostgres(cluster)
    embedded._pg_ctl(["stop", "-w", "-m", "immediate"])
    down = request("GET", node.url + "/api/v1/stats")
    ready_down = request("GET", node.url + "/ready")
    embedded.ensure_started()
    recovered = wait_for_status(node.url + "/api/v1/stats", 200)
    status = node.stop()

    assert (down.status, down.json()["error"]) == (503, "db_unavailable")
    assert ready_down.status == 503
    assert recovered == 200
    assert status in (0, -signal.SIGTERM)
    assert "stopped cleanly" in node.log()

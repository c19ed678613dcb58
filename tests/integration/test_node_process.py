"""
The node as operators run it: C{twistd -n gitlawb}.
"""

from __future__ import annotations

import signal

from tests.support import request


def test_health_and_sigterm(start_node) -> None:
    """The plugin starts under twistd -n, answers /health, and stops on SIGTERM."""
    node = start_node()

    health = request("GET", node.url + "/health")
    status = node.stop()

    assert health.status == 200
    assert health.json() == {"status": "ok"}
    assert status in (0, -signal.SIGTERM)
    assert "stopped cleanly" in node.log()


def test_embedded_database(start_node) -> None:
    """Without DATABASE_URL the node runs on its embedded PostgreSQL."""
    node = start_node(embedded=True)

    ready = request("GET", node.url + "/ready")
    stats = request("GET", node.url + "/api/v1/stats")
    node.stop()

    assert ready.json() == {"status": "ready"}
    assert stats.json()["repos"] == 0
    assert "embedded PostgreSQL stopped" in node.log()

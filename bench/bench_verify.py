"""Time verify_signed_request on the protocol's test vector.

Run: ``python bench/bench_verify.py [iterations]``. Prints microseconds per
call for a signed POST checked against a ReplayGuard (each call a fresh
signature, as a real node sees them) and for a repeated signed GET.
"""

from __future__ import annotations

import sys
import time

from twisted.internet.task import Clock

from gitlawb.identity.keys import NodeKey
from gitlawb.identity.signatures import (
    ReplayGuard,
    content_digest,
    sign_request,
    verify_signed_request,
)

GOAL_US = 200.0


def main(iterations: int) -> None:
    key = NodeKey.from_seed(bytes(range(32)))
    body = (
        b'{"default_branch":"main","description":null,"is_public":true,"name":"demo"}'
    )
    digest = content_digest(body)
    created = 1796311673
    clock = Clock()
    clock.advance(created)
    guard = ReplayGuard(clock, max_entries=iterations + 1)

    # Distinct signatures (one per target) so the replay guard accepts each.
    posts = [
        {
            name.lower(): value
            for name, value in sign_request(
                key, "POST", f"/api/v1/repos?n={i}", body, created
            ).items()
        }
        for i in range(iterations)
    ]
    get = {
        name.lower(): value
        for name, value in sign_request(
            key, "GET", "/api/v1/repos", b"", created
        ).items()
    }

    start = time.perf_counter()
    for i, headers in enumerate(posts):
        verify_signed_request(
            method="POST",
            target=f"/api/v1/repos?n={i}",
            headers=headers.get,
            body_digest=digest,
            now=clock.seconds(),
            replay=guard,
        )
    post_us = (time.perf_counter() - start) / iterations * 1e6

    start = time.perf_counter()
    for _ in range(iterations):
        verify_signed_request(
            method="GET",
            target="/api/v1/repos",
            headers=get.get,
            body_digest=None,
            now=clock.seconds(),
            replay=guard,
        )
    get_us = (time.perf_counter() - start) / iterations * 1e6

    print(f"POST with replay guard: {post_us:.1f} us/verify (goal < {GOAL_US:.0f})")
    print(f"GET:                    {get_us:.1f} us/verify (goal < {GOAL_US:.0f})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)

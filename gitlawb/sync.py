"""
Replication: mirroring other nodes' repositories (PROTOCOL.md section 9).

A ref update reaches this node by HTTP notify or by gossip; either way it is
handed to L{enqueue_ref_update}, which stores it once (duplicates are
dropped) and, when it is verified (it really comes from the node it names,
a known peer), queues a sync of the repository from that node.  The queue
holds one live row per (origin, repository): later updates fold into the
pending row instead of piling up.

L{SyncWorker} claims rows with C{FOR UPDATE SKIP LOCKED}, so any number of
workers on one database never take the same row, and mirrors with plain
git over the origin's smart HTTP: C{git clone --mirror} into a temporary
directory renamed into place the first time, C{git fetch --prune} after
that, each git bounded in time and killed with its process group.  The
mirror is registered in C{repos} under its original owner and name (so the
normal smart HTTP routes serve clones of it) and the origin is told with a
signed C{PUT .../replicas}.  A failure is retried with a doubling delay up
to C{GITLAWB_SYNC_MAX_ATTEMPTS} attempts, then recorded as failed with its
reason; a row this node must not act on (a repository of its own, a mirror
of another origin, a malformed slug) is recorded as rejected.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gitlawb import metrics
from gitlawb.db.pool import Database
from gitlawb.db.service import DatabaseService, DatabaseUnavailable
from gitlawb.git.process import GitError, GitProcess, GitResult
from gitlawb.git.store import (
    InvalidName,
    RepositoryStore,
    owner_short_key,
    validate_branch_name,
    validate_repo_name,
    validate_revision,
)
from gitlawb.identity.keys import InvalidDid, full_did
from gitlawb.peers import (
    Peer,
    PeerAddressRefused,
    PeerClient,
    PeerError,
    Resolver,
    backoff_delay,
    get_peer,
    normalise_peer_url,
    resolve_public,
)
from gitlawb.workloop import InFlight, WorkLoop, stop_within_grace

__all__ = [
    "IntakeResult",
    "InvalidRefUpdate",
    "LocalRepo",
    "MirrorPlan",
    "MirrorResult",
    "Mirrorer",
    "SqlSyncQueue",
    "SyncFailed",
    "SyncJob",
    "SyncQueue",
    "SyncRejected",
    "SyncWorker",
    "enqueue_ref_update",
    "enqueue_sync",
    "local_conflict",
    "parse_ref_update",
    "parse_repo_slug",
    "queue_peer_repositories",
    "ref_update_handler",
]

log = Logger()

_SHA = re.compile(r"\A[0-9a-f]{40}(?:[0-9a-f]{24})?\Z")

# Bounds on the free-text members of a ref update: generous for real
# senders, small enough that the table is no free storage.
_MAX_TIMESTAMP = 64
_MAX_CERT_ID = 100
_MAX_FROM_PEER = 200
_MAX_REF_NAME = 255

# The in-process workers, woken when a row is queued (workers of other
# processes find it at their next poll).
_WORKERS: set[SyncWorker] = set()


# -- Reading ref updates ---------------------------------------------------------


class InvalidRefUpdate(ValueError):
    """
    A ref update (notify body or gossip message) is malformed; the message
    says which member and why.
    """


def parse_repo_slug(slug: str) -> tuple[str, str]:
    """
    Read C{"<owner short key>/<name>"} (a full DID is accepted as the owner,
    and one C{.git} suffix on the name).

    @return: the owner's short key and the bare name.
    @raise InvalidRefUpdate: when either part is not valid.
    """
    owner, sep, name = slug.partition("/")
    if not sep or "/" in name:
        raise InvalidRefUpdate(f"repo must be <owner>/<name>, not {slug[:120]!r}")
    try:
        return owner_short_key(owner), validate_repo_name(name)
    except InvalidName as e:
        raise InvalidRefUpdate(str(e)) from None


def _did(value: Any, member: str, *, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise InvalidRefUpdate(f"{member} must be a did:key string")
    try:
        return full_did(value)
    except (InvalidDid, ValueError):
        raise InvalidRefUpdate(f"{member} is not a did:key") from None


def _sha(value: Any, member: str, *, required: bool) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not _SHA.match(value):
        raise InvalidRefUpdate(f"{member} must be a lowercase hex object id")
    return value


def _text(value: Any, member: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or "\x00" in value:
        raise InvalidRefUpdate(f"{member} must be a string of at most {limit}")
    return value


def parse_ref_update(update: Mapping[str, Any]) -> dict[str, Any]:
    """
    Check a ref update and return it in canonical form: full DIDs, the slug
    as C{<owner short>/<name>}, C{owner_did} filled in from the slug.

    @raise InvalidRefUpdate: for a missing or malformed member, or an
        C{owner_did} that is not the slug's owner.
    """
    repo = update.get("repo")
    if not isinstance(repo, str):
        raise InvalidRefUpdate("repo is required: <owner>/<name>")
    owner_short, name = parse_repo_slug(repo)
    owner_did = full_did(owner_short)
    claimed_owner = _did(update.get("owner_did"), "owner_did", required=False)
    if claimed_owner is not None and claimed_owner != owner_did:
        raise InvalidRefUpdate("owner_did is not the owner named in repo")

    ref_name = update.get("ref_name")
    if (
        not isinstance(ref_name, str)
        or not ref_name.startswith("refs/")
        or len(ref_name) > _MAX_REF_NAME
    ):
        raise InvalidRefUpdate("ref_name must be a full ref name (refs/...)")
    try:
        validate_revision(ref_name)
    except InvalidName:
        raise InvalidRefUpdate("ref_name is not a valid ref name") from None

    return {
        "node_did": _did(update.get("node_did"), "node_did", required=True),
        "pusher_did": _did(update.get("pusher_did"), "pusher_did", required=False),
        "repo": f"{owner_short}/{name}",
        "owner_did": owner_did,
        "ref_name": ref_name,
        "old_sha": _sha(update.get("old_sha"), "old_sha", required=False),
        "new_sha": _sha(update.get("new_sha"), "new_sha", required=True),
        "timestamp": _text(update.get("timestamp"), "timestamp", _MAX_TIMESTAMP),
        "cert_id": _text(update.get("cert_id"), "cert_id", _MAX_CERT_ID),
    }


# -- Intake -------------------------------------------------------------------


@dataclass(frozen=True)
class IntakeResult:
    """
    What became of a ref update.

    @ivar update: the update in canonical form.
    @ivar new: whether it was stored now (or now verified), as opposed to
        a duplicate of one already stored.
    @ivar queued: whether a sync of its repository is queued for it.
    @ivar reason: why it was not queued, when it was not.
    """

    update: dict[str, Any]
    new: bool
    queued: bool
    reason: str | None = None


async def enqueue_ref_update(
    db: Database,
    update: Mapping[str, Any],
    from_peer: str,
    verified: bool,
    *,
    auto_sync: bool = True,
    local_did: str | None = None,
) -> IntakeResult:
    """
    Store a ref update received from a peer (HTTP notify or gossip) and,
    when it is verified, queue a sync of its repository from its node.

    Each (node, repo, ref, new sha) is stored once; a later verified copy of
    an unverified one upgrades it (and is then acted on).  A sync is queued
    only for a verified, new update whose node is a known peer (its HTTP URL
    is where the repository is fetched from), when C{auto_sync} is on, and
    never for a repository this node holds as its own or mirrors from
    another node.

    @param update: the ref update as received (PROTOCOL.md section 9).
    @param from_peer: who handed it over: the signer's DID, a libp2p peer
        id, or C{http:<ip>} for an unsigned notify.
    @param verified: whether it provably comes from its C{node_did}.
    @param local_did: this node's DID: its own updates are never synced.
    @raise InvalidRefUpdate: when the update is malformed.
    """
    parsed = parse_ref_update(update)
    rows = await db.query(
        "INSERT INTO ref_updates_received (node_did, pusher_did, repo, owner_did,"
        '  ref_name, old_sha, new_sha, "timestamp", cert_id, from_peer, verified)'
        " VALUES (%(node_did)s, %(pusher_did)s, %(repo)s, %(owner_did)s,"
        "  %(ref_name)s, %(old_sha)s, %(new_sha)s, %(timestamp)s, %(cert_id)s,"
        "  %(from_peer)s, %(verified)s)"
        " ON CONFLICT (node_did, repo, ref_name, new_sha) DO UPDATE SET"
        "  verified = true, from_peer = EXCLUDED.from_peer"
        " WHERE EXCLUDED.verified AND NOT ref_updates_received.verified"
        " RETURNING id",
        {**parsed, "from_peer": from_peer[:_MAX_FROM_PEER], "verified": verified},
    )
    if not rows:
        return IntakeResult(parsed, False, False, "already received")
    if not verified:
        return IntakeResult(parsed, True, False, "not verified")
    if not auto_sync:
        return IntakeResult(parsed, True, False, "automatic sync is off")
    node_did = parsed["node_did"]
    if node_did == local_did:
        return IntakeResult(parsed, True, False, "an update of this node")
    peer = await get_peer(db, node_did)
    if peer is None:
        return IntakeResult(parsed, True, False, "its node is not a known peer")
    _, name = parse_repo_slug(parsed["repo"])
    reason = await local_conflict(db, parsed["owner_did"], name, node_did)
    if reason is not None:
        return IntakeResult(parsed, True, False, reason)
    await enqueue_sync(
        db,
        origin_did=node_did,
        origin_url=peer.http_url,
        repo_slug=parsed["repo"],
        owner_did=parsed["owner_did"],
        ref_name=parsed["ref_name"],
        new_sha=parsed["new_sha"],
    )
    return IntakeResult(parsed, True, True)


def ref_update_handler(
    database: DatabaseService, *, auto_sync: bool, local_did: str
) -> Callable[[dict[str, Any], str, bool], Coroutine[Any, Any, None]]:
    """
    The gossip service's C{on_ref_update}: each update goes through
    L{enqueue_ref_update}; a malformed one, or one that comes while the
    database is down, is logged and dropped (gossip is best effort; the
    HTTP notify and the catch-up at start fill the gaps).
    """

    async def on_ref_update(
        update: dict[str, Any], from_peer: str, verified: bool
    ) -> None:
        try:
            await enqueue_ref_update(
                database.database,
                update,
                from_peer,
                verified,
                auto_sync=auto_sync,
                local_did=local_did,
            )
        except InvalidRefUpdate as e:
            log.info(
                "gossip ref update dropped from={peer}: {error}",
                peer=from_peer,
                error=e,
            )
        except DatabaseUnavailable:
            log.info("gossip ref update dropped: the database is not up yet")

    return on_ref_update


async def local_conflict(
    db: Database, owner_did: str, name: str, origin_did: str
) -> str | None:
    """
    Why a repository must not be synced from C{origin_did}, or C{None}.
    """
    rows = await db.query(
        "SELECT origin_did FROM repos WHERE owner_did = %s AND name = %s",
        (owner_did, name),
    )
    if not rows:
        return None
    origin = rows[0]["origin_did"]
    if origin is None:
        return "the repository is this node's own"
    if origin != origin_did:
        return f"the repository is mirrored from {origin}"
    return None


async def enqueue_sync(
    db: Database,
    *,
    origin_did: str,
    origin_url: str,
    repo_slug: str,
    owner_did: str | None = None,
    ref_name: str | None = None,
    new_sha: str | None = None,
) -> None:
    """
    Queue a sync of C{repo_slug} from C{origin_did}, or fold into the live
    row for them: the newest ref and URL win, a row waiting out a retry
    delay becomes due now, and a row being worked on is marked to run once
    more (its git may have started before this update was pushed).  Wakes
    the workers of this process.
    """
    await db.execute(
        "INSERT INTO sync_queue (origin_did, origin_url, repo_slug, owner_did,"
        "  ref_name, new_sha)"
        " VALUES (%(origin_did)s, %(origin_url)s, %(slug)s, %(owner_did)s,"
        "  %(ref_name)s, %(new_sha)s)"
        " ON CONFLICT (origin_did, repo_slug) WHERE status IN ('pending', 'running')"
        " DO UPDATE SET"
        "  origin_url = EXCLUDED.origin_url,"
        "  owner_did = COALESCE(EXCLUDED.owner_did, sync_queue.owner_did),"
        "  ref_name = COALESCE(EXCLUDED.ref_name, sync_queue.ref_name),"
        "  new_sha = COALESCE(EXCLUDED.new_sha, sync_queue.new_sha),"
        "  generation = sync_queue.generation + 1,"
        "  next_attempt_at = LEAST(sync_queue.next_attempt_at, now()),"
        "  updated_at = now()",
        {
            "origin_did": origin_did,
            "origin_url": origin_url,
            "slug": repo_slug,
            "owner_did": owner_did,
            "ref_name": ref_name,
            "new_sha": new_sha,
        },
    )
    for worker in list(_WORKERS):
        worker.wake()


#: Pages of 200 repositories read from one peer by a sync trigger.
MAX_TRIGGER_PAGES = 50


async def queue_peer_repositories(db: Database, client: PeerClient, peer: Peer) -> int:
    """
    List a peer's repositories (C{GET /api/v1/repos}, page by page) and
    queue a sync of each public one it may be mirrored from.

    @return: how many were queued (or folded into a live row).
    @raise PeerError: when the peer cannot be listed.
    """
    queued = 0
    for page in range(MAX_TRIGGER_PAGES):
        listing = await client.get_json(
            peer.http_url, f"/api/v1/repos?limit=200&offset={page * 200}"
        )
        if not isinstance(listing, list):
            raise PeerError("the repository list is not a JSON array")
        for item in listing:
            if not isinstance(item, dict) or item.get("is_public") is False:
                continue
            owner, name = item.get("owner_did"), item.get("name")
            if not isinstance(owner, str) or not isinstance(name, str):
                continue
            try:
                owner_short, bare = parse_repo_slug(f"{owner}/{name}")
            except InvalidRefUpdate:
                continue
            owner_did = full_did(owner_short)
            if await local_conflict(db, owner_did, bare, peer.did) is not None:
                continue
            await enqueue_sync(
                db,
                origin_did=peer.did,
                origin_url=peer.http_url,
                repo_slug=f"{owner_short}/{bare}",
                owner_did=owner_did,
            )
            queued += 1
        if len(listing) < 200:
            break
    return queued


# -- The queue -----------------------------------------------------------------


@dataclass(frozen=True)
class SyncJob:
    """
    One claimed C{sync_queue} row.

    @ivar attempts: attempts including this one.
    @ivar generation: how many updates had folded into the row when it was
        claimed; a different value at the end means it must run again.
    """

    id: int
    origin_did: str
    origin_url: str
    repo_slug: str
    owner_did: str | None
    ref_name: str | None
    new_sha: str | None
    attempts: int
    generation: int


@dataclass(frozen=True)
class LocalRepo:
    id: str
    origin_did: str | None


class SyncQueue(Protocol):
    """
    The worker's view of the database.
    """

    async def claim(self, worker: str, lease: float) -> SyncJob | None:
        """
        Take the next due row, or C{None}.
        """

    async def local_repo(self, owner_did: str, name: str) -> LocalRepo | None:
        """
        The repository of this node with that owner and name, if any.
        """

    async def register_mirror(self, plan: MirrorPlan, result: MirrorResult) -> bool:
        """
        Record the mirror in C{repos}; C{False} when the name is taken by a
        repository that is not this mirror.
        """

    async def complete(self, worker: str, job: SyncJob) -> bool:
        """
        The row is done; C{False} when it was put back to run once more
        (updates folded into it meanwhile).
        """

    async def retry(self, worker: str, job: SyncJob, delay: float, error: str) -> None:
        """
        Try the row again in C{delay} seconds.
        """

    async def finish(self, worker: str, job: SyncJob, status: str, error: str) -> None:
        """
        Record the row C{failed} or C{rejected} with its reason.
        """

    async def release(self, worker: str, job: SyncJob) -> None:
        """
        Hand back a row whose attempt was cut (the attempt does not count).
        """

    async def requeue_mirrors(self) -> int:
        """
        Queue a refresh of every mirror this node holds; the count queued.
        """


_JOB_COLUMNS = (
    "id, origin_did, origin_url, repo_slug, owner_did, ref_name, new_sha,"
    " attempts, generation"
)


class SqlSyncQueue:
    """
    L{SyncQueue} over the C{sync_queue} and C{repos} tables.

    A claimed row is C{running}, leased to one worker until C{claimed_until};
    a worker that dies lets its rows go when the lease ends (they are put
    back to C{pending} by the next worker that looks).
    """

    def __init__(
        self,
        database: DatabaseService,
        clock: IReactorTime,
        *,
        reap_interval: float = 60.0,
    ) -> None:
        self._database = database
        self._clock = clock
        self._reap_interval = reap_interval
        self._last_reap: float | None = None

    @property
    def _db(self) -> Database:
        return self._database.database

    async def claim(self, worker: str, lease: float) -> SyncJob | None:
        await self._reap_expired()
        rows = await self._db.query(
            "UPDATE sync_queue SET status = 'running', claimed_by = %(worker)s,"
            "  claimed_until = now() + make_interval(secs => %(lease)s),"
            "  attempts = attempts + 1, updated_at = now()"
            " WHERE id = ("
            "  SELECT id FROM sync_queue"
            "  WHERE status = 'pending' AND next_attempt_at <= now()"
            "  ORDER BY next_attempt_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)"
            f" RETURNING {_JOB_COLUMNS}",
            {"worker": worker, "lease": lease},
        )
        if not rows:
            return None
        row = rows[0]
        return SyncJob(
            id=int(row["id"]),
            origin_did=row["origin_did"],
            origin_url=row["origin_url"],
            repo_slug=row["repo_slug"],
            owner_did=row["owner_did"],
            ref_name=row["ref_name"],
            new_sha=row["new_sha"],
            attempts=int(row["attempts"]),
            generation=int(row["generation"]),
        )

    async def _reap_expired(self) -> None:
        now = self._clock.seconds()
        if self._last_reap is not None and now - self._last_reap < self._reap_interval:
            return
        self._last_reap = now
        rows = await self._db.query(
            "UPDATE sync_queue SET status = 'pending', claimed_by = NULL,"
            "  claimed_until = NULL, updated_at = now()"
            " WHERE status = 'running' AND claimed_until < now() RETURNING id"
        )
        if rows:
            log.warn(
                "sync rows whose worker vanished put back: {count}", count=len(rows)
            )

    async def local_repo(self, owner_did: str, name: str) -> LocalRepo | None:
        rows = await self._db.query(
            "SELECT id, origin_did FROM repos WHERE owner_did = %s AND name = %s",
            (owner_did, name),
        )
        return LocalRepo(str(rows[0]["id"]), rows[0]["origin_did"]) if rows else None

    async def register_mirror(self, plan: MirrorPlan, result: MirrorResult) -> bool:
        rows = await self._db.query(
            "INSERT INTO repos (id, owner_did, name, description, is_public,"
            "  default_branch, origin_did, origin_url)"
            " VALUES (%(id)s, %(owner)s, %(name)s, %(description)s, true,"
            "  %(branch)s, %(origin_did)s, %(origin_url)s)"
            " ON CONFLICT (owner_did, name) DO UPDATE SET"
            "  origin_url = EXCLUDED.origin_url,"
            "  default_branch = EXCLUDED.default_branch,"
            "  description = COALESCE(EXCLUDED.description, repos.description),"
            "  updated_at = now()"
            " WHERE repos.origin_did = EXCLUDED.origin_did"
            " RETURNING id",
            {
                "id": str(uuid.uuid4()),
                "owner": plan.owner_did,
                "name": plan.name,
                "description": result.description,
                "branch": result.default_branch or "main",
                "origin_did": plan.origin_did,
                "origin_url": plan.origin_url,
            },
        )
        return bool(rows)

    async def complete(self, worker: str, job: SyncJob) -> bool:
        rows = await self._db.query(
            "UPDATE sync_queue SET"
            "  status = CASE WHEN generation = %(gen)s THEN 'done' ELSE 'pending' END,"
            "  attempts = CASE WHEN generation = %(gen)s THEN attempts ELSE 0 END,"
            "  claimed_by = NULL, claimed_until = NULL, last_error = NULL,"
            "  next_attempt_at = now(), updated_at = now()"
            " WHERE id = %(id)s AND claimed_by = %(worker)s AND status = 'running'"
            " RETURNING status",
            {"gen": job.generation, "id": job.id, "worker": worker},
        )
        return not rows or rows[0]["status"] == "done"

    async def retry(self, worker: str, job: SyncJob, delay: float, error: str) -> None:
        await self._db.execute(
            "UPDATE sync_queue SET status = 'pending', claimed_by = NULL,"
            "  claimed_until = NULL, last_error = %(error)s,"
            "  next_attempt_at = now() + make_interval(secs => %(delay)s),"
            "  updated_at = now()"
            " WHERE id = %(id)s AND claimed_by = %(worker)s AND status = 'running'",
            {"error": error[:1000], "delay": delay, "id": job.id, "worker": worker},
        )

    async def finish(self, worker: str, job: SyncJob, status: str, error: str) -> None:
        # An update that folded in meanwhile gets a fresh row's chances.
        await self._db.execute(
            "UPDATE sync_queue SET"
            "  status = CASE WHEN generation = %(gen)s THEN %(status)s"
            "   ELSE 'pending' END,"
            "  attempts = CASE WHEN generation = %(gen)s THEN attempts ELSE 0 END,"
            "  claimed_by = NULL, claimed_until = NULL, last_error = %(error)s,"
            "  next_attempt_at = now(), updated_at = now()"
            " WHERE id = %(id)s AND claimed_by = %(worker)s AND status = 'running'",
            {
                "gen": job.generation,
                "status": status,
                "error": error[:1000],
                "id": job.id,
                "worker": worker,
            },
        )

    async def release(self, worker: str, job: SyncJob) -> None:
        await self._db.execute(
            "UPDATE sync_queue SET status = 'pending', claimed_by = NULL,"
            "  claimed_until = NULL, attempts = GREATEST(attempts - 1, 0),"
            "  next_attempt_at = now(), updated_at = now()"
            " WHERE id = %s AND claimed_by = %s AND status = 'running'",
            (job.id, worker),
        )

    async def requeue_mirrors(self) -> int:
        db = self._db
        rows = await db.query(
            "SELECT owner_did, name, origin_did, origin_url FROM repos"
            " WHERE origin_did IS NOT NULL AND origin_url IS NOT NULL"
        )
        for row in rows:
            await enqueue_sync(
                db,
                origin_did=row["origin_did"],
                origin_url=row["origin_url"],
                repo_slug=f"{owner_short_key(row['owner_did'])}/{row['name']}",
                owner_did=row["owner_did"],
            )
        return len(rows)


# -- Mirroring with git ----------------------------------------------------------


class SyncFailed(Exception):
    """
    A sync attempt failed in a way that may pass (network, origin, git).
    """


class SyncRejected(Exception):
    """
    A sync this node must not carry out; retrying will not change that.
    """


@dataclass(frozen=True)
class MirrorPlan:
    """
    What to mirror, from where, to where (every part already checked).
    """

    owner_did: str
    owner_short: str
    name: str
    origin_did: str
    origin_url: str
    path: Path

    @property
    def slug(self) -> str:
        return f"{self.owner_short}/{self.name}"

    @property
    def clone_url(self) -> str:
        return f"{self.origin_url}/{self.owner_short}/{self.name}.git"


@dataclass(frozen=True)
class MirrorResult:
    created: bool
    default_branch: str | None
    description: str | None = None


class Mirrorer:
    """
    Makes and refreshes mirrors with git.

    Every git runs with no inherited config, never prompts, speaks only
    http(s), follows no redirect, checks every object it receives, gives up
    on a transfer stalled for a minute, and is killed with its process group
    at C{timeout} seconds or when the work is cancelled.

    @param store: where the repositories live; its C{path_for} validates the
        owner and name, so nothing is written outside the repositories
        directory.
    @param resolve: host lookups for the public-address check made before
        git connects (unless C{allow_private}).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        store: RepositoryStore,
        *,
        timeout: float,
        allow_private: bool,
        resolve: Resolver,
        clock: IReactorTime | None = None,
        executable: str = "git",
    ) -> None:
        self._reactor = reactor
        self._clock = clock
        self._store = store
        self._timeout = timeout
        self._allow_private = allow_private
        self._resolve = resolve
        self._executable = executable
        stall = str(int(max(5, min(60, timeout))))
        self._config = (
            ("protocol.allow", "never"),
            ("protocol.http.allow", "always"),
            ("protocol.https.allow", "always"),
            ("http.followRedirects", "false"),
            ("transfer.fsckObjects", "true"),
            ("http.lowSpeedLimit", "1"),
            ("http.lowSpeedTime", stall),
        )

    def path_for(self, owner_short: str, name: str) -> Path:
        """
        @raise InvalidName: for an invalid owner or name.
        """
        return self._store.path_for(owner_short, name)

    async def mirror(self, plan: MirrorPlan) -> MirrorResult:
        """
        Clone the repository when this node has no copy, else fetch into it.

        @raise SyncFailed: when git fails or the origin cannot be reached.
        @raise PeerAddressRefused: when the origin's host is not public.
        @raise GitError: when git runs out of time or is cancelled.
        """
        if not self._allow_private:
            # git resolves the name again; this narrows, not closes, the
            # window for a name that changes its answer.
            host = urlsplit(plan.origin_url)
            await resolve_public(
                host.hostname or "",
                host.port or (443 if host.scheme == "https" else 80),
                self._resolve,
                allow_private=False,
            )
        if (plan.path / "HEAD").is_file():
            await self._fetch(plan)
            return MirrorResult(False, await self._head_branch(plan.path))
        await self._clone(plan)
        return MirrorResult(True, await self._head_branch(plan.path))

    async def _clone(self, plan: MirrorPlan) -> None:
        plan.path.parent.mkdir(parents=True, exist_ok=True)
        # Beside the final place, named as the store names its temporary
        # directories, so a crash leaves nothing the store will not sweep.
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=plan.path.parent))
        try:
            await self._checked(
                [
                    "clone",
                    "--mirror",
                    "--quiet",
                    "--template=",
                    "--",
                    plan.clone_url,
                    str(staging),
                ],
                cwd=plan.path.parent,
            )
            # TODO(#sync-configure): RepositoryStore should expose its serving
            # config as a public method; this is the one place outside the
            # store that needs it.
            await self._store._configure(staging)
            try:
                os.rename(staging, plan.path)
            except OSError as e:
                raise SyncFailed(f"cannot move the clone into place: {e}") from None
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        self.log.info(
            "mirror created repo={repo} origin={origin}",
            repo=plan.slug,
            origin=plan.origin_url,
        )

    async def _fetch(self, plan: MirrorPlan) -> None:
        await self._checked(
            [
                "fetch",
                "--prune",
                "--quiet",
                "--no-write-fetch-head",
                "--",
                plan.clone_url,
                "+refs/*:refs/*",
            ],
            cwd=plan.path,
        )
        # Follow the origin's default branch.
        remote = await self._git(
            ["ls-remote", "--symref", "--", plan.clone_url, "HEAD"], cwd=plan.path
        )
        target = _symref_target(remote.stdout) if remote.ok else None
        if target is not None:
            current = await self._git(
                ["symbolic-ref", "--quiet", "HEAD"], cwd=plan.path
            )
            if current.stdout.decode("utf-8", "replace").strip() != target:
                await self._checked(["symbolic-ref", "HEAD", target], cwd=plan.path)
        self.log.debug("mirror fetched repo={repo}", repo=plan.slug)

    async def _head_branch(self, path: Path) -> str | None:
        head = await self._git(["symbolic-ref", "--quiet", "--short", "HEAD"], cwd=path)
        branch = head.stdout.decode("utf-8", "replace").strip()
        try:
            return validate_branch_name(branch) if head.ok and branch else None
        except InvalidName:
            return None

    async def _checked(self, args: list[str], cwd: Path) -> GitResult:
        result = await self._git(args, cwd=cwd)
        if not result.ok:
            tail = result.stderr.decode("utf-8", "replace").strip().splitlines()
            reason = tail[-1] if tail else f"exit status {result.exit_code}"
            raise SyncFailed(f"git {args[0]} failed: {reason[:300]}")
        return result

    async def _git(self, args: list[str], cwd: Path) -> GitResult:
        """
        Run git; cancelling kills its process group (the returned awaitable
        then fails with C{CancelledError} once the group is gone).
        """
        output = bytearray()

        def collect(data: bytes) -> None:
            if len(output) < 1024 * 1024:
                output.extend(data)

        env = {"GIT_CONFIG_COUNT": str(len(self._config))}
        for index, (key, value) in enumerate(self._config):
            env[f"GIT_CONFIG_KEY_{index}"] = key
            env[f"GIT_CONFIG_VALUE_{index}"] = value
        process = GitProcess(
            args,
            reactor=self._reactor,
            clock=self._clock,
            tap=collect,
            timeout=self._timeout,
            cwd=cwd,
            executable=self._executable,
            extra_env=env,
        )
        waiter: Deferred[int] = Deferred(
            lambda _: process.cancel("sync cut at shutdown")
        )
        process.start().chainDeferred(waiter)
        try:
            code = await waiter
        except CancelledError:
            try:
                await process.finished
            except Exception:
                pass
            raise
        return GitResult(code, bytes(output), process.stderr)


def _symref_target(output: bytes) -> str | None:
    for line in output.decode("utf-8", "replace").splitlines():
        if line.startswith("ref: ") and line.endswith("\tHEAD"):
            target = line[len("ref: ") : -len("\tHEAD")]
            if target.startswith("refs/heads/"):
                try:
                    validate_branch_name(target[len("refs/heads/") :])
                except InvalidName:
                    return None
                return target
    return None


# -- The worker ----------------------------------------------------------------


class SyncWorker(Service):
    """
    Claims C{sync_queue} rows and mirrors their repositories.

    Runs C{concurrency} rows at a time.  At start (and once the database is
    up) it queues a refresh of every mirror it already holds, to catch up
    with what was pushed while the node was down.

    @param queue: the rows and the C{repos} table.
    @param mirrorer: runs git.
    @param client: tells origins about new replicas and reads their repo
        descriptions.
    @param public_url: this node's public URL, registered at the origin.
    @param grace: seconds a stop lets rows in progress finish before their
        git is killed and the rows are handed back.
    @ivar cut_off: rows cut by the last stop.
    """

    name = "sync-worker"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        queue: SyncQueue,
        mirrorer: Mirrorer,
        client: PeerClient,
        *,
        public_url: Callable[[], str],
        max_attempts: int = 8,
        grace: float | Callable[[], float] = 30.0,
        concurrency: int = 2,
        poll_interval: float = 1.0,
        backoff_initial: float = 10.0,
        backoff_max: float = 3600.0,
        lease: float = 1920.0,
        catch_up: bool = True,
        worker_id: str | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._queue = queue
        self._mirrorer = mirrorer
        self._client = client
        self._public_url = public_url
        self._max_attempts = max_attempts
        self._grace = grace
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._lease = lease
        self._catch_up = catch_up
        self.worker_id = worker_id or (
            f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        )
        self._in_flight = InFlight()
        self._loops = [
            WorkLoop(
                self._clock,
                self.run_one,
                name=f"{self.name}-{index}",
                poll_interval=poll_interval,
            )
            for index in range(max(1, concurrency))
        ]
        self._replicas_told: set[tuple[str, str]] = set()
        self._caught_up = not catch_up
        self.cut_off = 0

    def startService(self) -> None:
        super().startService()
        self._in_flight = InFlight()
        self._caught_up = not self._catch_up
        _WORKERS.add(self)
        for loop in self._loops:
            loop.start()

    def wake(self) -> None:
        """
        A row was queued: look now rather than at the next poll.
        """
        for loop in self._loops:
            loop.wake()

    def stopService(self) -> Deferred[None]:
        """
        Stop claiming rows; let rows in progress finish, or at the grace
        deadline kill their git and hand them back to the queue.

        @return: a Deferred that fires when no row is being worked on.
        """
        super().stopService()
        _WORKERS.discard(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.cut_off = await stop_within_grace(
            self._clock,
            self._loops,
            self._in_flight,
            self._grace() if callable(self._grace) else self._grace,
        )
        if self.cut_off:
            self.log.warn(
                "sync cut at the grace deadline; rows handed back={count}",
                count=self.cut_off,
            )

    async def run_one(self) -> bool:
        """
        Claim one due row and carry it out.

        @return: whether a row was claimed.
        """
        if not self._caught_up:
            self._caught_up = True
            try:
                count = await self._queue.requeue_mirrors()
            except Exception:
                self._caught_up = False
                raise
            if count:
                self.log.info("queued a refresh of mirrors={count}", count=count)
        job = await self._queue.claim(self.worker_id, self._lease)
        if job is None:
            return False
        await self._process(job)
        return True

    async def _process(self, job: SyncJob) -> None:
        try:
            plan = await self._plan(job)
            result = await self._in_flight.run(self._mirror(plan))
            if not await self._queue.register_mirror(plan, result):
                raise SyncRejected(f"{plan.slug} appeared here as another repository")
        except CancelledError:
            if not self._in_flight.cutting:
                raise
            await self._queue.release(self.worker_id, job)
            self.log.info("sync of {repo} cut; handed back", repo=job.repo_slug)
            return
        except SyncRejected as e:
            await self._queue.finish(self.worker_id, job, "rejected", str(e))
            metrics.record_sync("rejected")
            self.log.warn(
                "sync rejected repo={repo} origin={origin} reason={reason}",
                repo=job.repo_slug,
                origin=job.origin_did,
                reason=str(e),
            )
            return
        except (SyncFailed, PeerError, GitError, OSError) as e:
            await self._failed(job, _reason(e))
            return
        except Exception as e:
            self.log.failure("sync of {repo} failed unexpectedly", repo=job.repo_slug)
            await self._failed(job, _reason(e))
            return

        finished = await self._queue.complete(self.worker_id, job)
        metrics.record_sync("done")
        self.log.info(
            "synced repo={repo} origin={origin} created={created} again={again}",
            repo=plan.slug,
            origin=plan.origin_did,
            created=result.created,
            again=not finished,
        )
        await self._tell_origin(plan)

    async def _plan(self, job: SyncJob) -> MirrorPlan:
        """
        Check a row against this node before any git runs.

        @raise SyncRejected: when it must not be carried out.
        """
        try:
            owner_short, name = parse_repo_slug(job.repo_slug)
        except InvalidRefUpdate as e:
            raise SyncRejected(str(e)) from None
        owner_did = full_did(owner_short)
        if job.owner_did is not None and job.owner_did != owner_did:
            raise SyncRejected("owner_did is not the owner named in the slug")
        if job.origin_did == self._client.key.did:
            raise SyncRejected("the origin is this node")
        try:
            origin_url = normalise_peer_url(
                job.origin_url, allow_private=self._client.allow_private
            )
            path = self._mirrorer.path_for(owner_short, name)
        except (PeerAddressRefused, InvalidName) as e:
            raise SyncRejected(str(e)) from None
        local = await self._queue.local_repo(owner_did, name)
        if local is not None and local.origin_did is None:
            raise SyncRejected("the repository is this node's own")
        if local is not None and local.origin_did != job.origin_did:
            raise SyncRejected(f"the repository is mirrored from {local.origin_did}")
        return MirrorPlan(
            owner_did, owner_short, name, job.origin_did, origin_url, path
        )

    async def _mirror(self, plan: MirrorPlan) -> MirrorResult:
        try:
            result = await self._mirrorer.mirror(plan)
        except PeerAddressRefused as e:
            raise SyncRejected(str(e)) from None
        if not result.created:
            return result
        # A new mirror takes the origin's description (best effort).
        try:
            info = await self._client.get_json(
                plan.origin_url, f"/api/v1/repos/{plan.owner_short}/{plan.name}"
            )
        except PeerError as e:
            self.log.info("no description from origin: {error}", error=e)
            return result
        description = info.get("description") if isinstance(info, dict) else None
        if isinstance(description, str) and len(description) <= 2000:
            return MirrorResult(True, result.default_branch, description)
        return result

    async def _failed(self, job: SyncJob, reason: str) -> None:
        if job.attempts >= self._max_attempts:
            await self._queue.finish(self.worker_id, job, "failed", reason)
            metrics.record_sync("failed")
            self.log.warn(
                "sync failed for good repo={repo} origin={origin} attempts={n}"
                " reason={reason}",
                repo=job.repo_slug,
                origin=job.origin_did,
                n=job.attempts,
                reason=reason,
            )
            return
        delay = backoff_delay(job.attempts, self._backoff_initial, self._backoff_max)
        await self._queue.retry(self.worker_id, job, delay, reason)
        metrics.record_sync("deferred")
        self.log.info(
            "sync failed repo={repo} attempt={n}; retrying in {delay:.0f}s"
            " reason={reason}",
            repo=job.repo_slug,
            n=job.attempts,
            delay=delay,
            reason=reason,
        )

    async def _tell_origin(self, plan: MirrorPlan) -> None:
        """
        Register this node as a replica at the origin, once per mirror for
        the life of the process (again after a restart); a failure is
        logged and tried at the next sync.
        """
        key = (plan.origin_did, plan.slug)
        if key in self._replicas_told:
            return
        url = self._client.url_for(
            plan.origin_url, f"/api/v1/repos/{plan.owner_short}/{plan.name}/replicas"
        )
        try:
            response = await self._in_flight.run(
                self._client.request("PUT", url, json_body={"url": self._public_url()})
            )
        except CancelledError:
            return
        except PeerError as e:
            self.log.info("replica registration failed: {error}", error=e)
            return
        if response.ok:
            self._replicas_told.add(key)
        else:
            self.log.info(
                "origin refused the replica registration repo={repo} status={status}",
                repo=plan.slug,
                status=response.status,
            )


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:500]

"""
Recording pushes: what git actually updated becomes push events, the pusher's
trust, ref certificates, webhook deliveries and outbox rows for the peers, all
in one transaction.

Before receive-pack starts, a I{push intent} row records who pushes what to
which repository.  The transaction that records the outcome also closes the
intent.  If the node dies between git moving a ref and that transaction, the
intent is still open at the next start, and L{PushRecorder.reconcile} compares
it with the refs on disk and records what git did, exactly once.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from gitlawb import metrics
from gitlawb.api.agents import record_push_trust
from gitlawb.db.pool import Database
from gitlawb.git.report import RefCommand
from gitlawb.git.store import RepositoryStore
from gitlawb.identity.keys import NodeKey, short_key
from gitlawb.identity.tokens import format_timestamp, sign_certificate

log = Logger()


@dataclass(frozen=True)
class RepoRef:
    """
    The repository a push goes to, as the recorder needs it.
    """

    id: str
    owner_did: str
    name: str
    is_public: bool
    path: Path

    @property
    def slug(self) -> str:
        return f"{short_key(self.owner_did)}/{self.name}"


@dataclass(frozen=True)
class RefUpdate:
    """
    One ref git updated.
    """

    ref: str
    old: str
    new: str
    forced: bool = False

    @property
    def created(self) -> bool:
        return set(self.old) == {"0"}

    @property
    def deleted(self) -> bool:
        return set(self.new) == {"0"}


async def applied_commands(
    store: RepositoryStore, path: Path, commands: Sequence[RefCommand]
) -> list[RefCommand]:
    """
    The commands the repository shows as carried out: each ref now points
    where its command asked (absent for a deletion).  Used when git's own
    report is missing: git was killed, or the node died before recording.
    """
    current = dict(await store.list_refs(path)) if path.exists() else {}
    return [
        c
        for c in commands
        if current.get(c.ref, "0" * len(c.new)) == c.new and c.old != c.new
    ]


class PushRecorder:
    """
    Writes intents and outcomes of pushes.

    @param public_url: returns this node's public URL (for clone URLs in
        webhook payloads).
    """

    def __init__(
        self, key: NodeKey, store: RepositoryStore, public_url: Any, now: Any
    ) -> None:
        self._key = key
        self._store = store
        self._public_url = public_url
        self._now = now
        # Intents this process opened and has not closed: their git may be
        # running, so reconciliation leaves them alone.
        self._open: set[str] = set()

    async def open_intent(
        self,
        db: Database,
        repo: RepoRef,
        pusher_did: str,
        commands: Sequence[RefCommand],
    ) -> str:
        """
        Record that a push is about to reach git.

        @return: the intent's id.
        """
        intent_id = str(uuid.uuid4())
        await db.execute(
            "INSERT INTO push_intents (id, repo_id, pusher_did, commands)"
            " VALUES (%s, %s, %s, %s)",
            (
                intent_id,
                repo.id,
                pusher_did,
                json.dumps([[c.old, c.new, c.ref] for c in commands]),
            ),
        )
        self._open.add(intent_id)
        return intent_id

    async def record(
        self,
        db: Database,
        intent_id: str,
        repo: RepoRef,
        pusher_did: str,
        updates: Sequence[RefUpdate],
    ) -> list[dict[str, Any]]:
        """
        Record what git updated, and close the intent, in one transaction.

        @return: the certificates issued (one per updated ref).
        """
        try:
            certificates = await db.transaction(
                self._record, intent_id, repo, pusher_did, list(updates)
            )
        finally:
            self._open.discard(intent_id)
        if updates:
            # One push, however many refs it moved.
            metrics.record_push(repo.slug)
        return certificates

    async def _record(
        self,
        cursor: Any,
        intent_id: str,
        repo: RepoRef,
        pusher_did: str,
        updates: list[RefUpdate],
    ) -> list[dict[str, Any]]:
        # Close the intent first: a concurrent reconciliation that already
        # closed it means the rows exist and must not be written twice.  A
        # push that updated nothing is abandoned, not recorded.
        await cursor.execute(
            "UPDATE push_intents SET state = %s, finished_at = now()"
            " WHERE id = %s AND state = 'running' RETURNING id",
            ("recorded" if updates else "abandoned", intent_id),
        )
        if cursor.fetchone() is None:
            return []
        if not updates:
            return []

        # The pusher's trust grows with each push (PROTOCOL.md section 4).
        await record_push_trust(cursor, pusher_did)

        hooks = await self._matching_hooks(cursor, repo.id, "push")
        certificates = []
        for update in updates:
            await cursor.execute(
                "INSERT INTO push_events"
                " (push_id, repo_id, pusher_did, ref_name, old_sha, new_sha, forced)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (push_id, ref_name) DO NOTHING",
                (
                    intent_id,
                    repo.id,
                    pusher_did,
                    update.ref,
                    update.old,
                    update.new,
                    update.forced,
                ),
            )
            certificate = await self._certify(cursor, repo, pusher_did, update)
            certificates.append(certificate)
            await self._deliveries(cursor, hooks, repo, pusher_did, update)
            await self._announce(cursor, repo, pusher_did, update, certificate)

        await cursor.execute(
            "UPDATE repos SET updated_at = now() WHERE id = %s", (repo.id,)
        )
        return certificates

    async def _certify(
        self, cursor: Any, repo: RepoRef, pusher_did: str, update: RefUpdate
    ) -> dict[str, Any]:
        """
        Issue (or replace: one per repository and ref, the id stays) the ref
        certificate of PROTOCOL.md section 7.
        """
        issued_at = format_timestamp(self._now())
        signature = sign_certificate(
            self._key,
            new=update.new,
            old=update.old,
            pusher=pusher_did,
            ref=update.ref,
            repo_id=repo.id,
            ts=issued_at,
        )
        await cursor.execute(
            "INSERT INTO ref_certificates (id, repo_id, ref_name, old_sha, new_sha,"
            " pusher_did, node_did, signature, issued_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (repo_id, ref_name) DO UPDATE SET"
            "  old_sha = EXCLUDED.old_sha, new_sha = EXCLUDED.new_sha,"
            "  pusher_did = EXCLUDED.pusher_did, node_did = EXCLUDED.node_did,"
            "  signature = EXCLUDED.signature, issued_at = EXCLUDED.issued_at"
            " RETURNING id",
            (
                str(uuid.uuid4()),
                repo.id,
                update.ref,
                update.old,
                update.new,
                pusher_did,
                self._key.did,
                signature,
                issued_at,
            ),
        )
        row = cursor.fetchone()
        return {
            "id": str(row[0]),
            "repo_id": repo.id,
            "ref_name": update.ref,
            "old_sha": update.old,
            "new_sha": update.new,
            "pusher_did": pusher_did,
            "node_did": self._key.did,
            "signature": signature,
            "issued_at": issued_at,
        }

    @staticmethod
    async def _matching_hooks(cursor: Any, repo_id: str, event: str) -> list[Any]:
        await cursor.execute(
            "SELECT id FROM webhooks WHERE repo_id = %s AND active"
            " AND (events ? '*' OR events ? %s)",
            (repo_id, event),
        )
        return list(cursor.fetchall())

    async def _deliveries(
        self,
        cursor: Any,
        hooks: list[Any],
        repo: RepoRef,
        pusher_did: str,
        update: RefUpdate,
    ) -> None:
        """
        Store one webhook delivery per matching hook; the dispatcher sends
        them (and retries) from the table.
        """
        if not hooks:
            return
        body = json.dumps(
            {
                "ref": update.ref,
                "before": update.old,
                "after": update.new,
                "created": update.created,
                "forced": update.forced,
                "pusher": {"did": pusher_did},
                "repository": {
                    "id": repo.id,
                    "name": repo.name,
                    "owner_did": repo.owner_did,
                    "clone_url": f"{self._public_url()}/{repo.slug}.git",
                },
            },
            separators=(",", ":"),
        )
        for hook in hooks:
            await cursor.execute(
                "INSERT INTO webhook_deliveries (id, webhook_id, event, body)"
                " VALUES (%s, %s, 'push', %s)",
                (str(uuid.uuid4()), hook[0], body),
            )

    async def _announce(
        self,
        cursor: Any,
        repo: RepoRef,
        pusher_did: str,
        update: RefUpdate,
        certificate: dict[str, Any],
    ) -> None:
        """
        Queue the ref-update announcement to peers (gossip and HTTP notify);
        private repositories are never announced.
        """
        if not repo.is_public:
            return
        payload = {
            "node_did": self._key.did,
            "pusher_did": pusher_did,
            "repo": repo.slug,
            "owner_did": repo.owner_did,
            "ref_name": update.ref,
            "old_sha": update.old,
            "new_sha": update.new,
            "timestamp": certificate["issued_at"],
            "cert_id": certificate["id"],
        }
        await cursor.execute(
            "INSERT INTO outbox (kind, payload) VALUES ('ref_update', %s)",
            (json.dumps(payload),),
        )

    async def reconcile(self, db: Database) -> int:
        """
        Record the pushes whose git finished but whose transaction did not
        (the node died in between).  Intents this process opened are left
        alone (their git may still run); the others must have no git left
        running (see L{gitlawb.git.smart_http.GitService}, which kills the
        ones a killed node left behind before calling this).

        @return: how many intents were closed.
        """
        rows = await db.query(
            "SELECT i.id, i.pusher_did, i.commands, r.id AS repo_id, r.owner_did,"
            " r.name, r.is_public FROM push_intents i JOIN repos r ON r.id = i.repo_id"
            " WHERE i.state = 'running' ORDER BY i.created_at"
        )
        closed = 0
        for row in rows:
            if str(row["id"]) in self._open:
                continue
            owner_short = short_key(row["owner_did"])
            path = self._store.path_for(owner_short, row["name"])
            repo = RepoRef(
                str(row["repo_id"]),
                row["owner_did"],
                row["name"],
                row["is_public"],
                path,
            )
            commands = [RefCommand(old, new, ref) for old, new, ref in row["commands"]]
            updates = [
                RefUpdate(c.ref, c.old, c.new)
                for c in await applied_commands(self._store, path, commands)
            ]
            # An intent whose refs did not move is closed as abandoned.
            await self.record(db, str(row["id"]), repo, row["pusher_did"], updates)
            log.info(
                "reconciled interrupted push intent={intent} repo={repo} refs={count}",
                intent=str(row["id"]),
                repo=repo.slug,
                count=len(updates),
            )
            closed += 1
        return closed

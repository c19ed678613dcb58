"""
Repositories (PROTOCOL.md section 5): creating, forking, listing, and reading
commits, refs, trees and blobs.

Visibility: a private repository exists only for its owner.  Everyone else
gets the same 404 C{repo_not_found} as for a repository that does not exist,
on every route, so neither its existence nor its name leaks.  L{find_repo}
applies that rule; the git smart HTTP layer uses it too.

Creating (and forking) writes a database row and a bare repository on disk,
"in one step": if either fails neither remains.  PostgreSQL and a directory
cannot share a transaction, so the order is chosen to make every crash window
recoverable:

  1. BEGIN; INSERT the row.  The unique (owner, name) index makes this insert
     the lock on the name: a concurrent create of the same name waits here
     until this transaction ends, then finds the row (409) or not.
  2. Make the repository: git works in a temporary directory beside the
     final place and renames it into place (L{RepositoryStore}).
  3. COMMIT.

- A failure in 2 rolls the row back; the store has removed its temporary
  directory.  A crash during 2 leaves only a C{.tmp-*} directory, which the
  store's stale-directory sweep removes.
- A failed COMMIT (or one whose answer was lost): a second transaction
  takes the name again and looks.  The name free: the commit failed, the
  repository is removed under that lock, and the lock row rolled back.  Our
  row there: the create succeeded after all.  Another create's row there:
  the directory is theirs and stays.  That transaction failing too (the
  database is away) leaves the directory as in the next case.
- A crash between 2 and 3 leaves a repository on disk with no row.  It is
  found by the next create of that owner and name: that create holds the
  name lock and no row exists, so nothing can be using the directory; it is
  removed and made afresh.  Until then nothing serves it (every route needs
  the row).

Whatever else creates repositories on disk (mirroring) must take the same
lock first, or it could lose a directory to the orphan clean-up of step 2.

The price: a pool connection stays taken while git makes the repository
(about 40 ms for a create, which runs eight git commands; a fork is a local
hard-linked clone).  Creates and forks are rate-limited per signer and per
IP, which bounds how much of the pool they can hold.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from gitlawb.api.agents import (
    authenticate_agent,
    bool_member,
    run_to_completion,
    text_member,
)
from gitlawb.api.app import (
    NodeContext,
    check_rate,
    client_ip,
    iso_timestamp,
    json_body,
)
from gitlawb.api.errors import (
    ApiError,
    bad_request,
    not_found,
    repo_not_found,
    write_json,
)
from gitlawb.git.process import GitError, GitTimeout
from gitlawb.git.store import (
    BlobTooLarge,
    GitCommandFailed,
    InvalidName,
    RepositoryExists,
    RepositoryNotFound,
    RepositoryStore,
    validate_branch_name,
    validate_repo_name,
    validate_revision,
    validate_tree_path,
)
from gitlawb.identity.keys import InvalidDid, full_did, short_key

__all__ = [
    "RepoRow",
    "canonical_did",
    "find_repo",
    "install",
    "repo_json",
    "repository_store",
]

log = Logger()

MAX_LIST_LIMIT = 200
DEFAULT_COMMITS = 30
MAX_COMMITS = 1000
MAX_DESCRIPTION_LENGTH = 2000
MAX_BLOB_BYTES = 10 * 1024 * 1024

# A query parameter that must be a number: short enough that int() is cheap.
_WHOLE_NUMBER = re.compile(r"\A\s*[+-]?[0-9]{1,12}\s*\Z")

REPO_COLUMNS = (
    "id, owner_did, name, description, is_public, default_branch, star_count,"
    " forked_from, origin_did, origin_url, created_at, updated_at"
)


@dataclass(frozen=True)
class RepoRow:
    """
    One row of the C{repos} table.

    @ivar forked_from: the id of the repository this one was forked from.
    @ivar origin_did: for a mirror of another node's repository, that node.
    """

    id: str
    owner_did: str
    name: str
    description: str | None
    is_public: bool
    default_branch: str
    star_count: int
    forked_from: str | None
    origin_did: str | None
    origin_url: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> RepoRow:
        """
        Read a row selected with L{REPO_COLUMNS}.
        """
        return cls(
            id=str(row["id"]),
            owner_did=row["owner_did"],
            name=row["name"],
            description=row["description"],
            is_public=bool(row["is_public"]),
            default_branch=row["default_branch"],
            star_count=int(row["star_count"]),
            forked_from=row["forked_from"],
            origin_did=row["origin_did"],
            origin_url=row["origin_url"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    @property
    def owner_short(self) -> str:
        """
        The owner's short key (C{z6Mk...}), as in URLs and on disk.
        """
        # Rows hold the canonical full form, so no base58 round trip is needed.
        return self.owner_did.removeprefix("did:key:")

    @property
    def slug(self) -> str:
        """
        C{<owner short>/<name>}.
        """
        return f"{self.owner_short}/{self.name}"

    def visible_to(self, viewer_did: str | None) -> bool:
        """
        Whether C{viewer_did} (a full DID, or C{None} for anonymous) may see
        this repository.
        """
        return self.is_public or viewer_did == self.owner_did


@functools.lru_cache(maxsize=4096)
def canonical_did(did_or_short: str) -> str:
    """
    L{full_did}, remembered: every repository route names an owner, and the
    base58 round trip is a noticeable part of a read's cost.

    @raise InvalidDid: as L{full_did} (failures are not remembered).
    """
    return full_did(did_or_short)


def repo_json(context: NodeContext, row: RepoRow) -> dict[str, Any]:
    """
    A repository as the protocol's Repo object.
    """
    base = context.public_url().rstrip("/")
    return {
        "id": row.id,
        "name": row.name,
        "owner_did": row.owner_did,
        "description": row.description,
        "is_public": row.is_public,
        "default_branch": row.default_branch,
        "clone_url": f"{base}/{row.owner_short}/{row.name}.git",
        "star_count": row.star_count,
        "created_at": iso_timestamp(row.created_at),
        "updated_at": iso_timestamp(row.updated_at),
        "forked_from": row.forked_from,
    }


def repository_store(context: NodeContext) -> RepositoryStore:
    """
    The node's L{RepositoryStore} (C{context.services["store"]}), made on
    first use when the node did not provide one.
    """
    store = context.services.get("store")
    if store is None:
        store = RepositoryStore(context.settings.repositories_path, context.reactor)
        context.services["store"] = store
    assert isinstance(store, RepositoryStore)
    return store


async def find_repo(
    context: NodeContext, owner: str, name: str, viewer_did: str | None
) -> RepoRow:
    """
    The repository C{owner}/C{name} as C{viewer_did} may see it.

    @param owner: the owner's full DID or short key, as in a URL.
    @param name: the repository name, with or without one C{.git}.
    @param viewer_did: the caller's full DID, or C{None} when anonymous.
    @return: the row.
    @raise ApiError: 404 C{repo_not_found} when there is no such repository,
        when the owner or name cannot name one, and when it is private and
        the viewer is not its owner.
    """
    try:
        owner_did = canonical_did(owner)
        bare = validate_repo_name(name)
    except (InvalidDid, InvalidName):
        raise repo_not_found() from None
    rows = await context.db.query(
        f"SELECT {REPO_COLUMNS} FROM repos WHERE owner_did = %s AND name = %s",
        (owner_did, bare),
    )
    if not rows:
        raise repo_not_found()
    row = RepoRow.from_row(rows[0])
    if not row.visible_to(viewer_did):
        raise repo_not_found()
    return row


# -- Requests ----------------------------------------------------------------


def _query_text(request: IRequest, name: str) -> str | None:
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return str(values[0].decode("utf-8"))
    except UnicodeDecodeError:
        raise bad_request(f"{name} is not UTF-8 text") from None


def _query_int(
    request: IRequest, name: str, low: int, high: int | None = None
) -> int | None:
    text = _query_text(request, name)
    if text is None:
        return None
    if not _WHOLE_NUMBER.match(text):
        raise bad_request(f"{name} must be a whole number")
    value = int(text)
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"{low} or more"
        raise bad_request(f"{name} must be {bounds}")
    return value


@contextmanager
def _git_errors() -> Iterator[None]:
    """
    Turn the repository store's and git's failures into API errors.
    """
    try:
        yield
    except InvalidName as e:
        raise bad_request(str(e)) from None
    except BlobTooLarge as e:
        raise ApiError(
            "payload_too_large",
            f"the file has {e.size} bytes, more than the {e.limit} this route "
            "returns; clone the repository to read it",
            413,
        ) from None
    except GitTimeout:
        raise ApiError("git_timeout", "git took too long", 504) from None
    except (GitCommandFailed, GitError) as e:
        log.error("git failed: {error}", error=str(e))
        raise ApiError("git_error", "git failed on this repository") from None
    except OSError as e:
        # The repositories directory itself: full disk, permissions, a file
        # where a directory should be.  The operator must look.
        log.error("repository storage failed: {error}", error=str(e))
        raise ApiError("git_error", "cannot write repositories on this node") from None


def _repository_path(store: RepositoryStore, row: RepoRow) -> Path:
    """
    Where C{row}'s repository is on disk.

    @raise ApiError: 500 C{git_error} when it is missing (the row and the
        disk disagree: logged for the operator).
    """
    path = store.path_for(row.owner_short, row.name)
    if not (path / "HEAD").is_file():
        log.error(
            "repository row without a repository on disk repo={slug} path={path}",
            slug=row.slug,
            path=path,
        )
        raise ApiError("git_error", "the repository's data is missing on this node")
    return path


# -- Creating ----------------------------------------------------------------


_INSERT_REPO = (
    "INSERT INTO repos (id, owner_did, name, description, is_public,"
    "                   default_branch, forked_from)"
    " VALUES (%(id)s, %(owner_did)s, %(name)s, %(description)s,"
    "         %(is_public)s, %(default_branch)s, %(forked_from)s)"
    " ON CONFLICT DO NOTHING"
    f" RETURNING {REPO_COLUMNS}"
)


class _Undone(Exception):
    """
    Rolls back the transaction that held a name while its repository was
    removed.
    """


async def create_with_repository(
    context: NodeContext,
    store: RepositoryStore,
    values: dict[str, Any],
    make: Callable[[], Awaitable[Path]],
) -> RepoRow:
    """
    Insert a repository row and make its repository on disk, both or neither
    (see the module docstring for the order and its crash windows).

    @param values: the row: C{id}, C{owner_did}, C{name}, C{description},
        C{is_public}, C{default_branch}, C{forked_from}.
    @param make: makes the repository on disk and returns its path; raises
        L{RepositoryExists} when a directory is already there.
    @return: the committed row.
    @raise ApiError: 409 C{repo_exists} when the name is taken.
    """
    owner_short = short_key(values["owner_did"])
    name = values["name"]
    made = False

    async def insert_and_make(cursor: Any) -> RepoRow:
        nonlocal made
        await cursor.execute(_INSERT_REPO, values)
        inserted = cursor.fetchone()
        if inserted is None:
            raise ApiError(
                "repo_exists", f"repository {owner_short}/{name} already exists"
            )
        try:
            await make()
        except RepositoryExists:
            # This transaction holds the name and no committed row has it:
            # a create that crashed before its commit left this behind.
            log.warn(
                "orphaned repository directory replaced repo={owner}/{name}",
                owner=owner_short,
                name=name,
            )
            store.remove(owner_short, name)
            await make()
        made = True
        return RepoRow.from_row(inserted)

    async def settle_failed_commit(cursor: Any) -> RepoRow | None:
        # Take the name again (a row that is never committed) so that no
        # other create can be making a repository there meanwhile.
        await cursor.execute(_INSERT_REPO, {**values, "id": str(uuid.uuid4())})
        if cursor.fetchone() is not None:
            # The name is free: the commit failed, the repository is ours.
            store.remove(owner_short, name)
            raise _Undone()
        # A committed row holds the name: ours (the commit went through and
        # only its answer was lost) or a later create's.
        await cursor.execute(
            f"SELECT {REPO_COLUMNS} FROM repos WHERE id = %s", (values["id"],)
        )
        found = cursor.fetchone()
        return None if found is None else RepoRow.from_row(found)

    try:
        return await context.db.transaction(insert_and_make)
    except Exception as failed:
        if not made:
            raise
        # The repository is on disk but the commit failed, or its answer was
        # lost: the row decides.
        committed: RepoRow | None = None
        try:
            committed = await context.db.transaction(settle_failed_commit)
        except _Undone:
            pass
        except Exception:
            log.failure(
                "cannot tell whether repository {owner}/{name} was committed;"
                " its directory stays until the next create of that name",
                owner=owner_short,
                name=name,
            )
        if committed is None or committed.id != values["id"]:
            raise failed
        log.warn(
            "commit reported failure but the row is there repo={owner}/{name}",
            owner=owner_short,
            name=name,
        )
        return committed


# -- Routes ------------------------------------------------------------------


def install(app: Klein, context: NodeContext) -> None:
    """
    Add the repository routes to C{app}.
    """
    store = repository_store(context)

    @app.route("/api/v1/repos", methods=["POST"])
    async def create_repo(request: IRequest) -> bytes:
        route = "/api/v1/repos"
        request.route_template = route  # type: ignore[attr-defined]
        signer = authenticate_agent(request, context, route, required=True)
        assert signer is not None

        body = json_body(request)
        raw_name = text_member(body, "name", required=True, max_length=200)
        assert raw_name is not None
        try:
            name = validate_repo_name(raw_name)
        except InvalidName:
            raise bad_request(
                "name may hold letters, digits, '-', '_' and '.' (not first or"
                " last, never '..'), at most 100 characters"
            ) from None
        description = text_member(
            body, "description", max_length=MAX_DESCRIPTION_LENGTH
        )
        is_public = bool_member(body, "is_public", True)
        branch = text_member(body, "default_branch", default="main", max_length=255)
        assert branch is not None
        try:
            validate_branch_name(branch)
        except InvalidName:
            raise bad_request(
                f"default_branch {branch!r} is not a valid branch name"
            ) from None

        check_rate(context.limits.per_signer, signer)
        check_rate(context.limits.create, client_ip(request, context))

        values = {
            "id": str(uuid.uuid4()),
            "owner_did": signer,
            "name": name,
            "description": description,
            "is_public": is_public,
            "default_branch": branch,
            "forked_from": None,
        }
        owner_short = short_key(signer)

        def make() -> Awaitable[Path]:
            return store.create_bare(owner_short, name, branch)

        with _git_errors():
            row = await run_to_completion(
                create_with_repository(context, store, values, make)
            )
        log.info(
            "repository created repo={slug} public={public}",
            slug=row.slug,
            public=row.is_public,
        )
        return write_json(request, 201, repo_json(context, row))

    @app.route("/api/v1/repos", methods=["GET"])
    async def list_repos(request: IRequest) -> bytes:
        route = "/api/v1/repos"
        request.route_template = route  # type: ignore[attr-defined]
        viewer = authenticate_agent(request, context, route, required=False)

        owner_text = _query_text(request, "owner")
        owner: str | None = None
        if owner_text:
            try:
                owner = canonical_did(owner_text)
            except InvalidDid:
                raise bad_request("owner must be a did:key (full or short)") from None
        # Without a limit every visible repository is listed, as the
        # reference node does: peers and older clients list that way.
        limit = _query_int(request, "limit", 1, MAX_LIST_LIMIT)
        offset = _query_int(request, "offset", 0) or 0

        params = {"viewer": viewer, "owner": owner, "limit": limit, "offset": offset}
        where = (
            " WHERE (is_public OR owner_did = %(viewer)s)"
            " AND (%(owner)s::text IS NULL OR owner_did = %(owner)s)"
        )
        rows = await context.db.query(
            f"SELECT {REPO_COLUMNS}, count(*) OVER () AS total FROM repos{where}"
            " ORDER BY created_at DESC, id LIMIT %(limit)s OFFSET %(offset)s",
            params,
        )
        if rows:
            total = int(rows[0]["total"])
        else:
            counted = await context.db.query(
                f"SELECT count(*) FROM repos{where}", params
            )
            total = int(counted[0][0])

        request.setHeader(b"x-total-count", str(total).encode("ascii"))
        return write_json(
            request, 200, [repo_json(context, RepoRow.from_row(r)) for r in rows]
        )

    @app.route("/api/v1/repos/<owner>/<repo>", methods=["GET"])
    async def show_repo(request: IRequest, owner: str, repo: str) -> bytes:
        route = "/api/v1/repos/{owner}/{repo}"
        request.route_template = route  # type: ignore[attr-defined]
        viewer = authenticate_agent(request, context, route, required=False)
        row = await find_repo(context, owner, repo, viewer)
        return write_json(request, 200, repo_json(context, row))

    @app.route("/api/v1/repos/<owner>/<repo>/fork", methods=["POST"])
    async def fork_repo(request: IRequest, owner: str, repo: str) -> bytes:
        route = "/api/v1/repos/{owner}/{repo}/fork"
        request.route_template = route  # type: ignore[attr-defined]
        signer = authenticate_agent(request, context, route, required=True)
        assert signer is not None

        body = json_body(request)
        raw_name = text_member(body, "name", max_length=200)
        name: str | None = None
        if raw_name is not None:
            try:
                name = validate_repo_name(raw_name)
            except InvalidName:
                raise bad_request(
                    "name may hold letters, digits, '-', '_' and '.' (not first"
                    " or last, never '..'), at most 100 characters"
                ) from None

        check_rate(context.limits.per_signer, signer)
        check_rate(context.limits.create, client_ip(request, context))

        source = await find_repo(context, owner, repo, signer)
        fork_name = name or source.name
        values = {
            "id": str(uuid.uuid4()),
            "owner_did": signer,
            "name": fork_name,
            "description": source.description,
            "is_public": source.is_public,
            "default_branch": source.default_branch,
            "forked_from": source.id,
        }
        owner_short = short_key(signer)

        async def make() -> Path:
            try:
                return await store.fork(
                    source.owner_short, source.name, owner_short, fork_name
                )
            except RepositoryNotFound:
                log.error(
                    "fork source has no repository on disk repo={slug}",
                    slug=source.slug,
                )
                raise ApiError(
                    "git_error", "the source repository's data is missing"
                ) from None

        with _git_errors():
            row = await run_to_completion(
                create_with_repository(context, store, values, make)
            )
        log.info(
            "repository forked from={source} to={slug}",
            source=source.slug,
            slug=row.slug,
        )
        return write_json(request, 201, repo_json(context, row))

    # Reading a repository's content.

    @app.route("/api/v1/repos/<owner>/<repo>/commits", methods=["GET"])
    async def list_commits(request: IRequest, owner: str, repo: str) -> bytes:
        route = "/api/v1/repos/{owner}/{repo}/commits"
        request.route_template = route  # type: ignore[attr-defined]
        viewer = authenticate_agent(request, context, route, required=False)
        branch = _query_text(request, "branch") or _query_text(request, "ref")
        limit = _query_int(request, "limit", 1, MAX_COMMITS) or DEFAULT_COMMITS
        if branch is not None:
            try:
                validate_revision(branch)
            except InvalidName:
                raise bad_request(
                    f"branch {branch[:100]!r} is not a valid ref"
                ) from None
        row = await find_repo(context, owner, repo, viewer)
        with _git_errors():
            path = _repository_path(store, row)
            commits = await store.commits(path, branch or row.default_branch, limit)
        return write_json(request, 200, {"commits": commits})

    @app.route("/api/v1/repos/<owner>/<repo>/refs", methods=["GET"])
    async def list_refs(request: IRequest, owner: str, repo: str) -> bytes:
        route = "/api/v1/repos/{owner}/{repo}/refs"
        request.route_template = route  # type: ignore[attr-defined]
        viewer = authenticate_agent(request, context, route, required=False)
        row = await find_repo(context, owner, repo, viewer)
        with _git_errors():
            refs = await store.list_refs(_repository_path(store, row))
        return write_json(
            request,
            200,
            {"refs": [{"name": n, "sha": s} for n, s in refs], "count": len(refs)},
        )

    async def tree(
        request: IRequest, route: str, owner: str, repo: str, subpath: str
    ) -> bytes:
        request.route_template = route  # type: ignore[attr-defined]
        viewer = authenticate_agent(request, context, route, required=False)
        revision = _revision(request)
        try:
            directory = validate_tree_path(subpath)
        except InvalidName:
            raise bad_request("path has an empty, '.' or '..' component") from None
        row = await find_repo(context, owner, repo, viewer)
        with _git_errors():
            path = _repository_path(store, row)
            ref = revision or row.default_branch
            entries = await store.tree(path, ref, directory)
            if entries is None:
                # An empty repository has an empty root, not a missing one.
                if directory or await store.resolve_commit(path, ref) is not None:
                    raise not_found(f"no directory {directory!r} at {ref!r}")
                entries = []
        return write_json(request, 200, {"entries": entries, "path": directory})

    @app.route("/api/v1/repos/<owner>/<repo>/tree", methods=["GET"])
    async def tree_root(request: IRequest, owner: str, repo: str) -> bytes:
        route = "/api/v1/repos/{owner}/{repo}/tree"
        return await tree(request, route, owner, repo, "")

    @app.route("/api/v1/repos/<owner>/<repo>/tree/<path:subpath>", methods=["GET"])
    async def tree_path(
        request: IRequest, owner: str, repo: str, subpath: str
    ) -> bytes:
        route = "/api/v1/repos/{owner}/{repo}/tree/{path}"
        return await tree(request, route, owner, repo, subpath)

    @app.route("/api/v1/repos/<owner>/<repo>/blob/<path:subpath>", methods=["GET"])
    async def blob(request: IRequest, owner: str, repo: str, subpath: str) -> bytes:
        route = "/api/v1/repos/{owner}/{repo}/blob/{path}"
        request.route_template = route  # type: ignore[attr-defined]
        viewer = authenticate_agent(request, context, route, required=False)
        revision = _revision(request)
        try:
            file_path = validate_tree_path(subpath)
        except InvalidName:
            raise bad_request("path has an empty, '.' or '..' component") from None
        row = await find_repo(context, owner, repo, viewer)
        with _git_errors():
            path = _repository_path(store, row)
            ref = revision or row.default_branch
            content = await store.blob(path, ref, file_path, MAX_BLOB_BYTES)
        if content is None:
            raise not_found(f"no file {file_path!r} at {ref!r}")
        request.setHeader(b"content-type", b"application/octet-stream")
        # Never let a browser render repository content as a page of ours.
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"content-security-policy", b"sandbox")
        return content

    @app.route("/api/v1/repos/<owner>/<repo>/replicas", methods=["GET"])
    async def list_replicas(request: IRequest, owner: str, repo: str) -> bytes:
        route = "/api/v1/repos/{owner}/{repo}/replicas"
        request.route_template = route  # type: ignore[attr-defined]
        viewer = authenticate_agent(request, context, route, required=False)
        row = await find_repo(context, owner, repo, viewer)
        rows = await context.db.query(
            "SELECT url, node_did, registered_at, updated_at FROM replicas"
            " WHERE repo_id = %s ORDER BY registered_at, url",
            (row.id,),
        )
        replicas = [
            {
                "replica_did": r["node_did"],
                "replica_url": r["url"],
                "registered_at": iso_timestamp(r["registered_at"]),
                "updated_at": iso_timestamp(r["updated_at"]),
            }
            for r in rows
        ]
        return write_json(
            request,
            200,
            {"repo": row.slug, "replica_count": len(replicas), "replicas": replicas},
        )


def _revision(request: IRequest) -> str | None:
    """
    The C{?ref=} (or C{?branch=}) of a content route, checked.
    """
    revision = _query_text(request, "ref") or _query_text(request, "branch")
    if revision is None:
        return None
    try:
        return validate_revision(revision)
    except InvalidName:
        raise bad_request(f"ref {revision[:100]!r} is not a valid ref") from None

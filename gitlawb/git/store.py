"""The bare repositories this node serves, on disk.

Layout: C{<root>/<owner short key>/<name>.git}. Both path components are
validated before they touch the filesystem (the owner as a did:key short
form, the name by L{validate_repo_name}), so no request can name a path
outside the root.

A repository appears atomically: it is made in a temporary directory
beside its final place (C{.tmp-*}, a name no valid repository can have)
and renamed into place, so a crash or a failed command never leaves a
half-made repository under a valid name. Removal renames it aside
(C{.trash-*}) before deleting it.

Every git command runs through L{gitlawb.git.process.run_git}: off the
reactor thread, bounded in time, killed with its process group. Revisions
and paths that come from requests are validated, and passed after
C{--end-of-options} or C{--}, so none can be read as an option.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TypedDict

import base58
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger

from gitlawb.git.process import GitResult, run_git

__all__ = [
    "BlobTooLarge",
    "CommitSummary",
    "GitCommandFailed",
    "InvalidName",
    "RepositoryExists",
    "RepositoryNotFound",
    "RepositoryStore",
    "StoreError",
    "TreeEntry",
    "owner_short_key",
    "validate_branch_name",
    "validate_owner_key",
    "validate_repo_name",
    "validate_revision",
    "validate_tree_path",
]

MAX_REPO_NAME_LENGTH = 100

# Letters, digits, "-" and "_", with "." allowed only inside the name.
_REPO_NAME = re.compile(r"\A[A-Za-z0-9_-](?:[A-Za-z0-9._-]*[A-Za-z0-9_-])?\Z")

# "z" (multibase base58btc) + base58 of 0xED 0x01 + a 32-byte Ed25519 key.
_OWNER_KEY = re.compile(r"\Az6Mk[1-9A-HJ-NP-Za-km-z]{40,50}\Z")
_ED25519_MULTICODEC = b"\xed\x01"

_HEX_REVISION = re.compile(r"\A[0-9a-f]{4,64}\Z")

# Characters git forbids in ref names (git-check-ref-format rules 3-5, 8, 10).
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{")

# The config every repository here gets, at creation and after a fork.
# Everything else is git's default: force pushes and deletions are allowed
# (webhooks report "forced"), HEAD is never moved by a push.
_SERVING_CONFIG: tuple[tuple[str, str], ...] = (
    # Refuse malformed or malicious objects (bad trees, .gitmodules tricks)
    # on push, before any ref moves; costs CPU per push, worth it on a
    # network where anyone can push.
    ("receive.fsckObjects", "true"),
    # Let clients make partial clones (--filter=blob:none) of big repos.
    ("uploadpack.allowFilter", "true"),
    # Protocol v2 clients may fetch by ref name; this avoids the race
    # between the ref advertisement and the fetch.
    # Only advertised tips (and, under v2, reachable commits) may be
    # fetched: never arbitrary objects someone may have deleted.
    ("uploadpack.allowAnySHA1InWant", "false"),
    # Keep a reflog in the bare repository so the operator can undo a
    # force push or a deletion.
    ("core.logAllRefUpdates", "true"),
    # fsync objects, packs and refs before git reports success, so a push
    # acknowledged to the client and recorded in the database survives a
    # power cut (git's default leaves loose objects and refs unsynced).
    ("core.fsync", "committed,derived-metadata"),
)
# Not set: http.receivepack (read by git-http-backend only; this node runs
# receive-pack itself and authorises pushes before it starts).

# Lock files git leaves when killed hard, relative to the repository.
_TOP_LEVEL_LOCKS = (
    "HEAD.lock",
    "packed-refs.lock",
    "config.lock",
    "index.lock",
    "shallow.lock",
)
# Quarantine directories of an interrupted push (git >= 2.11 names them
# incoming-*, later versions tmp_objdir-incoming-*).
_QUARANTINE_PREFIXES = ("incoming-", "tmp_objdir-")

STALE_AFTER_SECONDS = 3600.0


class StoreError(Exception):
    """
    Base class of the repository store's errors.
    """


class InvalidName(StoreError, ValueError):
    """
    An owner, repository name, branch, revision or path is not acceptable.
    """


class RepositoryExists(StoreError):
    """
    A repository already exists at that owner and name.
    """


class RepositoryNotFound(StoreError):
    """
    No repository exists at that owner and name.
    """


class GitCommandFailed(StoreError):
    """
    A git command the store needed exited with a failing status.
    """

    def __init__(self, args: Sequence[str], result: GitResult) -> None:
        stderr = result.stderr.decode("utf-8", "replace").strip()
        super().__init__(
            f"git {' '.join(args[:2])} exited {result.exit_code}: {stderr[-500:]}"
        )
        self.exit_code = result.exit_code
        self.stderr = stderr


class BlobTooLarge(StoreError):
    """
    The blob is larger than the caller allows.
    """

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"blob of {size} bytes exceeds the {limit} byte limit")
        self.size = size
        self.limit = limit


class CommitSummary(TypedDict):
    """
    One commit as the API lists it.
    """

    hash: str
    author: str
    date: str
    message: str


class TreeEntry(TypedDict):
    """
    One tree entry as the API lists it (C{size} is C{None} for trees and
    submodules).
    """

    mode: str
    type: str
    hash: str
    name: str
    size: int | None


def validate_repo_name(name: str) -> str:
    """
    Check a repository name, dropping one C{.git} suffix (URLs carry it).

    Allowed: letters, digits, C{-}, C{_}, and C{.} inside the name but never
    first, last or doubled, and never C{.git} at the end of what remains;
    at most 100 characters.

    @return: the name without the suffix.
    @raise InvalidName: otherwise.
    """
    bare = name.removesuffix(".git")
    if (
        not 0 < len(bare) <= MAX_REPO_NAME_LENGTH
        or not _REPO_NAME.match(bare)
        or ".." in bare
        or bare.endswith(".git")
    ):
        raise InvalidName(f"invalid repository name {name[:120]!r}")
    return bare


def validate_owner_key(owner: str) -> str:
    """
    Check a did:key short form (C{z6Mk...}): base58btc of an Ed25519
    multicodec public key.

    @return: the key unchanged.
    @raise InvalidName: otherwise.
    """
    if not _OWNER_KEY.match(owner):
        raise InvalidName(f"invalid owner key {owner[:80]!r}")
    decoded = base58.b58decode(owner[1:])
    if len(decoded) != 34 or not decoded.startswith(_ED25519_MULTICODEC):
        raise InvalidName(f"owner key is not an Ed25519 did:key {owner!r}")
    return owner


def owner_short_key(owner: str) -> str:
    """
    The short key of an owner given as C{did:key:z6Mk...} or C{z6Mk...}.

    @raise InvalidName: when it is neither.
    """
    return validate_owner_key(owner.removeprefix("did:key:"))


def _check_ref_rules(name: str) -> bool:
    """
    Whether a ref name (one level allowed) passes git-check-ref-format's
    rules.
    """
    if (
        not name
        or name == "@"
        or name.startswith(("/", "-"))
        or name.endswith(("/", "."))
        or "//" in name
        or _REF_FORBIDDEN.search(name)
    ):
        return False
    return all(
        not part.startswith(".") and not part.endswith(".lock")
        for part in name.split("/")
    )


def validate_branch_name(branch: str) -> str:
    """
    Check a branch name (without C{refs/heads/}) by git's rules, which
    C{git check-ref-format --branch} applies as well at creation.

    @return: the branch unchanged.
    @raise InvalidName: otherwise.
    """
    if len(branch) > 255 or branch == "HEAD" or not _check_ref_rules(branch):
        raise InvalidName(f"invalid branch name {branch[:120]!r}")
    return branch


def validate_revision(revision: str) -> str:
    """
    Check a revision from a request: a (possibly abbreviated) hex object id,
    C{HEAD}, a branch or tag name, or a full ref name. No revision
    expressions (C{~}, C{^}, C{@{...}}, C{:}), nothing starting with C{-}.

    @return: the revision unchanged.
    @raise InvalidName: otherwise.
    """
    if len(revision) <= 255 and (
        _HEX_REVISION.match(revision) or _check_ref_rules(revision)
    ):
        return revision
    raise InvalidName(f"invalid revision {revision[:120]!r}")


def validate_tree_path(path: str) -> str:
    """
    Check a path inside a tree; leading and trailing slashes are dropped.

    @return: the normalised path (C{""} for the root).
    @raise InvalidName: for empty, C{.} or C{..} components, NUL or newline
        characters, or more than 4096 characters.
    """
    normal = path.strip("/")
    if not normal:
        return ""
    if (
        len(normal) > 4096
        or "\0" in normal
        or "\n" in normal
        or any(part in ("", ".", "..") for part in normal.split("/"))
    ):
        raise InvalidName(f"invalid path {path[:120]!r}")
    return normal


def _is_within(candidate: str, directory: str) -> bool:
    """
    Whether a path string is the directory or lies beneath it.
    """
    return candidate == directory or candidate.startswith(directory + os.sep)


class RepositoryStore:
    """
    The bare repositories under one root directory.

    @param root: the repositories directory; created when first needed.
    @param reactor: spawns git.
    @param clock: times git deadlines and judges staleness; the reactor when
        not given.
    @param command_timeout: seconds any short git command may take.
    @param fork_timeout: seconds a fork's clone may take.
    """

    log = Logger()

    def __init__(
        self,
        root: Path,
        reactor: IReactorProcess,
        *,
        clock: IReactorTime | None = None,
        command_timeout: float = 60.0,
        fork_timeout: float = 600.0,
    ) -> None:
        self.root = root.resolve()
        self._reactor = reactor
        self._clock = clock
        self._command_timeout = command_timeout
        self._fork_timeout = fork_timeout

    # Paths.

    def path_for(self, owner_short: str, name: str) -> Path:
        """
        Where a repository lives (whether or not it exists).

        @param name: the repository name, with or without C{.git}.
        @raise InvalidName: for an invalid owner or name, or (defence in
            depth) when the path would resolve outside the root.
        """
        owner = validate_owner_key(owner_short)
        repo = validate_repo_name(name)
        path = self.root / owner / f"{repo}.git"
        if not _is_within(str(path.resolve()), str(self.root)):
            raise InvalidName(f"repository path escapes the root: {path}")
        return path

    def exists(self, owner_short: str, name: str) -> bool:
        """
        Whether the repository exists on disk.
        """
        return (self.path_for(owner_short, name) / "HEAD").is_file()

    # Creating, forking, removing.

    async def create_bare(
        self, owner_short: str, name: str, default_branch: str = "main"
    ) -> Path:
        """
        Create an empty bare repository whose HEAD names
        C{refs/heads/<default_branch>}, with the serving config.

        @return: its path.
        @raise InvalidName: for a bad owner, name or branch.
        @raise RepositoryExists: when it already exists (also when a
            concurrent create won the race).
        @raise GitCommandFailed: when git fails.
        """
        path = self.path_for(owner_short, name)
        validate_branch_name(default_branch)
        check = await self._git(["check-ref-format", "--branch", default_branch])
        if not check.ok:
            raise InvalidName(f"invalid branch name {default_branch!r}")
        if path.exists():
            raise RepositoryExists(str(path))

        with _staging(path) as staging:
            await self._git_checked(
                [
                    "init",
                    "--bare",
                    "--quiet",
                    # No template: no sample hooks, nothing from the host.
                    "--template=",
                    f"--initial-branch={default_branch}",
                    str(staging),
                ],
            )
            await self._configure(staging)
            self._move_into_place(staging, path)
        self.log.info(
            "repository created path={path} branch={branch}",
            path=path,
            branch=default_branch,
        )
        return path

    async def fork(
        self, src_owner: str, src_name: str, dst_owner: str, dst_name: str
    ) -> Path:
        """
        Copy a repository (every ref, and HEAD) to a new owner and/or name.

        The copy is a local mirror clone: objects are hard-linked, which is
        safe because git never modifies an object file in place. The clone's
        remote is removed, so the fork does not point at its source.

        @return: the new repository's path.
        @raise RepositoryNotFound: when the source does not exist.
        @raise RepositoryExists: when the destination does.
        @raise GitCommandFailed: when git fails.
        """
        src = self.path_for(src_owner, src_name)
        dst = self.path_for(dst_owner, dst_name)
        if not (src / "HEAD").is_file():
            raise RepositoryNotFound(str(src))
        if dst.exists():
            raise RepositoryExists(str(dst))

        head = await self._git(["symbolic-ref", "--quiet", "HEAD"], cwd=src)
        with _staging(dst) as staging:
            await self._git_checked(
                [
                    "clone",
                    "--mirror",
                    "--quiet",
                    "--template=",
                    "--",
                    str(src),
                    str(staging),
                ],
                timeout=self._fork_timeout,
            )
            await self._git_checked(
                ["config", "--remove-section", "remote.origin"], cwd=staging
            )
            # Cloning an empty repository cannot learn its HEAD; copy it.
            if head.ok:
                target = head.stdout.decode("utf-8").strip()
                await self._git_checked(["symbolic-ref", "HEAD", target], cwd=staging)
            await self._configure(staging)
            self._move_into_place(staging, dst)
        self.log.info("repository forked from={src} to={dst}", src=src, dst=dst)
        return dst

    def remove(self, owner_short: str, name: str) -> bool:
        """
        Delete a repository: rename it aside, then delete the renamed tree.

        Blocks for as long as the deletion takes, which is short for the
        intended use: undoing a create or fork whose database row could not
        be written.

        @return: whether there was a repository to remove.
        """
        path = self.path_for(owner_short, name)
        trash = path.parent / f".trash-{uuid.uuid4().hex}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        self.log.info("repository removed path={path}", path=path)
        return True

    # Reading.

    async def list_refs(self, path: Path) -> list[tuple[str, str]]:
        """
        Every ref of a repository, sorted by name.

        @return: C{(ref name, object id)} pairs.
        """
        result = await self._git_checked(
            ["for-each-ref", "--format=%(refname)%00%(objectname)"], cwd=path
        )
        refs = []
        for line in result.stdout.decode("utf-8", "replace").splitlines():
            name, _, sha = line.partition("\0")
            refs.append((name, sha))
        return refs

    async def head_ref(self, path: Path) -> str | None:
        """
        The ref HEAD names (C{refs/heads/main}), or C{None} when detached.
        """
        result = await self._git(["symbolic-ref", "--quiet", "HEAD"], cwd=path)
        return result.stdout.decode("utf-8").strip() if result.ok else None

    async def resolve_commit(self, path: Path, revision: str) -> str | None:
        """
        The commit a revision names.

        @return: its full object id, or C{None} when there is no such
            commit.
        @raise InvalidName: for an unacceptable revision.
        """
        validate_revision(revision)
        result = await self._git(
            [
                "rev-parse",
                "--verify",
                "--quiet",
                "--end-of-options",
                f"{revision}^{{commit}}",
            ],
            cwd=path,
        )
        return result.stdout.decode("ascii").strip() if result.ok else None

    async def commit_exists(self, path: Path, revision: str) -> bool:
        """
        Whether the revision names a commit in the repository.
        """
        return await self.resolve_commit(path, revision) is not None

    async def branch_exists(self, path: Path, branch: str) -> bool:
        """
        Whether C{refs/heads/<branch>} exists.
        """
        validate_branch_name(branch)
        result = await self._git(
            ["rev-parse", "--verify", "--quiet", f"refs/heads/{branch}"], cwd=path
        )
        return result.ok

    async def commits(
        self, path: Path, branch: str | None = None, limit: int = 50
    ) -> list[CommitSummary]:
        """
        The newest commits reachable from a revision (HEAD by default).

        @param limit: how many, clamped to 1..1000.
        @return: commits newest first, each with the author's name, the
            author date (RFC 3339, UTC) and the subject line; empty when the
            revision does not exist (an empty repository).
        """
        revision = validate_revision(branch) if branch else "HEAD"
        count = max(1, min(limit, 1000))
        result = await self._git(
            [
                "log",
                "-z",
                f"-n{count}",
                "--format=%H%x00%an%x00%at%x00%s",
                "--end-of-options",
                revision,
                "--",
            ],
            cwd=path,
        )
        if not result.ok:
            return []
        fields = result.stdout.decode("utf-8", "replace").split("\0")
        commits: list[CommitSummary] = []
        for i in range(0, len(fields) - 3, 4):
            sha, author, timestamp, subject = fields[i : i + 4]
            date = datetime.fromtimestamp(int(timestamp), UTC)
            commits.append(
                CommitSummary(
                    hash=sha,
                    author=author,
                    date=date.isoformat(timespec="microseconds"),
                    message=subject,
                )
            )
        return commits

    async def tree(
        self, path: Path, ref: str, subpath: str = ""
    ) -> list[TreeEntry] | None:
        """
        The entries of a directory at a revision.

        @return: the entries in git's order, or C{None} when the revision or
            the directory does not exist (or the path is not a directory).
        @raise InvalidName: for an unacceptable revision or path.
        """
        validate_revision(ref)
        directory = validate_tree_path(subpath)
        result = await self._git(
            ["ls-tree", "-l", "-z", "--end-of-options", f"{ref}:{directory}"],
            cwd=path,
        )
        if not result.ok:
            return None
        return [_tree_entry(record) for record in _nul_records(result.stdout)]

    async def blob(
        self, path: Path, ref: str, subpath: str, max_bytes: int = 10 * 1024 * 1024
    ) -> bytes | None:
        """
        The content of a file at a revision.

        @return: the bytes, or C{None} when there is no file at that path.
        @raise BlobTooLarge: when the file is larger than C{max_bytes}.
        @raise InvalidName: for an unacceptable revision or path.
        """
        validate_revision(ref)
        file_path = validate_tree_path(subpath)
        if not file_path:
            return None
        listing = await self._git(
            [
                "--literal-pathspecs",
                "ls-tree",
                "-l",
                "-z",
                "--full-tree",
                "--end-of-options",
                ref,
                "--",
                file_path,
            ],
            cwd=path,
        )
        records = list(_nul_records(listing.stdout)) if listing.ok else []
        if len(records) != 1:
            return None
        entry = _tree_entry(records[0], full_name=True)
        if entry["type"] != "blob" or entry["name"] != file_path:
            return None
        size = entry["size"] or 0
        if size > max_bytes:
            raise BlobTooLarge(size, max_bytes)
        content = await self._git_checked(
            ["cat-file", "blob", entry["hash"]], cwd=path, max_output=max_bytes
        )
        return content.stdout

    # Housekeeping.

    def clean_stale_locks(
        self,
        path: Path,
        older_than: float = STALE_AFTER_SECONDS,
        now: float | None = None,
    ) -> list[Path]:
        """
        Remove the lock files and push quarantine directories a killed git
        left behind in one repository.

        Candidates: C{HEAD.lock}, C{packed-refs.lock}, C{config.lock},
        C{index.lock}, C{shallow.lock}, C{refs/**/*.lock}, and
        C{objects/incoming-*} / C{objects/tmp_objdir-*} directories, each
        only when untouched for C{older_than} seconds.

        Nothing is removed while any process may be using the repository:
        one whose cwd is inside it, which has a file inside it open, or
        whose command line names it (git receive-pack before it has entered
        the repository), as C{/proc} shows. Only processes this user may
        inspect are visible there, which is why the age limit stays as a
        second guard. Without C{/proc} nothing is removed.

        Scans all of C{/proc}; meant for start-up and occasional sweeps.

        @param now: the current Unix time; the clock's (or the wall clock's)
            when not given.
        @return: what was removed.
        """
        repo = path.resolve()
        if not _is_within(str(repo), str(self.root)) or not repo.is_dir():
            raise InvalidName(f"not a repository of this store: {path}")
        current = now if now is not None else self._now()
        candidates = [
            p
            for p in self._lock_candidates(repo)
            if _newest_mtime(p) < current - older_than
        ]
        if not candidates:
            return []
        if _repository_in_use(repo):
            self.log.info(
                "stale locks kept, repository in use path={path} count={count}",
                path=repo,
                count=len(candidates),
            )
            return []

        removed = []
        for candidate in candidates:
            try:
                if candidate.is_dir() and not candidate.is_symlink():
                    shutil.rmtree(candidate)
                else:
                    candidate.unlink()
            except FileNotFoundError:
                continue
            removed.append(candidate)
        if removed:
            self.log.warn(
                "stale git locks removed path={path} removed={removed}",
                path=repo,
                removed=[str(p.relative_to(repo)) for p in removed],
            )
        return removed

    def clean_stale_temp_dirs(
        self, older_than: float = STALE_AFTER_SECONDS, now: float | None = None
    ) -> list[Path]:
        """
        Remove the C{.tmp-*} and C{.trash-*} directories that a crash during
        a create, fork or remove left in the owner directories.

        @return: what was removed.
        """
        if not self.root.is_dir():
            return []
        current = now if now is not None else self._now()
        removed = []
        for owner in self.root.iterdir():
            if not owner.is_dir() or owner.is_symlink():
                continue
            for entry in owner.iterdir():
                if not entry.name.startswith((".tmp-", ".trash-")):
                    continue
                if _newest_mtime(entry) >= current - older_than:
                    continue
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        if removed:
            self.log.warn(
                "stale temporary directories removed count={count}",
                count=len(removed),
            )
        return removed

    # Helpers.

    def _now(self) -> float:
        """
        The current time, from the injected clock when there is one.
        """
        if self._clock is not None:
            return self._clock.seconds()
        return datetime.now(UTC).timestamp()

    def _lock_candidates(self, repo: Path) -> Iterator[Path]:
        """
        Lock files and quarantine directories present in a repository.
        """
        for name in _TOP_LEVEL_LOCKS:
            candidate = repo / name
            if candidate.exists() or candidate.is_symlink():
                yield candidate
        refs = repo / "refs"
        for directory, _subdirs, files in os.walk(refs):
            for name in files:
                if name.endswith(".lock"):
                    yield Path(directory) / name
        objects = repo / "objects"
        if objects.is_dir():
            for entry in objects.iterdir():
                if entry.name.startswith(_QUARANTINE_PREFIXES) and entry.is_dir():
                    yield entry

    def _move_into_place(self, staging: Path, final: Path) -> None:
        """
        Rename a finished repository into place.

        @raise RepositoryExists: when something appeared there meanwhile (a
            real repository is never an empty directory, so the rename
            fails rather than replacing it).
        """
        try:
            os.rename(staging, final)
        except OSError as e:
            if final.exists():
                raise RepositoryExists(str(final)) from e
            raise

    async def _configure(self, repo: Path) -> None:
        """
        Write the serving config (see C{_SERVING_CONFIG}).
        """
        for key, value in _SERVING_CONFIG:
            await self._git_checked(["config", key, value], cwd=repo)

    async def _git(
        self,
        args: list[str],
        *,
        cwd: Path | None = None,
        timeout: float | None = None,
        max_output: int = 16 * 1024 * 1024,
    ) -> GitResult:
        """
        Run git; commands outside a repository run in the root.
        """
        if cwd is None:
            self.root.mkdir(parents=True, exist_ok=True)
        return await run_git(
            args,
            reactor=self._reactor,
            clock=self._clock,
            cwd=cwd if cwd is not None else self.root,
            timeout=timeout if timeout is not None else self._command_timeout,
            max_output=max_output,
        )

    async def _git_checked(
        self,
        args: list[str],
        *,
        cwd: Path | None = None,
        timeout: float | None = None,
        max_output: int = 16 * 1024 * 1024,
    ) -> GitResult:
        """
        Run git and raise L{GitCommandFailed} unless it succeeds.
        """
        result = await self._git(args, cwd=cwd, timeout=timeout, max_output=max_output)
        if not result.ok:
            raise GitCommandFailed(args, result)
        return result


@contextmanager
def _staging(final: Path) -> Iterator[Path]:
    """
    A temporary directory beside a repository's final place, deleted on the
    way out unless it was renamed into place meanwhile.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _nul_records(output: bytes) -> Iterator[bytes]:
    """
    The non-empty NUL-terminated records of C{-z} output.
    """
    return (record for record in output.split(b"\0") if record)


def _tree_entry(record: bytes, full_name: bool = False) -> TreeEntry:
    """
    Parse one C{ls-tree -l -z} record: C{<mode> <type> <oid> <size>\\t<name>}.
    """
    meta, _, raw_name = record.partition(b"\t")
    mode, kind, sha, size = meta.decode("ascii").split(maxsplit=3)
    name = raw_name.decode("utf-8", "replace")
    if not full_name:
        name = name.rsplit("/", 1)[-1]
    return TreeEntry(
        mode=mode,
        type=kind,
        hash=sha,
        name=name,
        size=int(size) if size.strip().isdigit() else None,
    )


def _newest_mtime(path: Path) -> float:
    """
    The latest modification time of a file, or of a directory and
    everything beneath it (without following symbolic links).
    """
    try:
        newest = path.lstat().st_mtime
    except FileNotFoundError:
        return float("inf")
    if path.is_dir() and not path.is_symlink():
        for directory, subdirs, files in os.walk(path):
            for name in (*subdirs, *files):
                try:
                    newest = max(
                        newest, os.lstat(os.path.join(directory, name)).st_mtime
                    )
                except FileNotFoundError:
                    continue
    return newest


def _repository_in_use(repo: Path) -> bool:
    """
    Whether any process visible in C{/proc} works in, holds a file of, or
    names the repository; C{True} when C{/proc} cannot be read.
    """
    proc = Path("/proc")
    target = str(repo)
    try:
        pids = [entry for entry in proc.iterdir() if entry.name.isdigit()]
    except OSError:
        return True
    if not pids:
        return True
    for pid in pids:
        try:
            if _is_within(os.readlink(pid / "cwd"), target):
                return True
        except OSError:
            pass
        try:
            arguments = (pid / "cmdline").read_bytes().split(b"\0")
            if any(target.encode() in argument for argument in arguments):
                return True
        except OSError:
            pass
        try:
            descriptors = list((pid / "fd").iterdir())
        except OSError:
            continue
        for descriptor in descriptors:
            try:
                if _is_within(os.readlink(descriptor), target):
                    return True
            except OSError:
                continue
    return False

"""RepositoryStore against real git."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.interfaces import IReactorProcess
from twisted.trial.unittest import TestCase

from gitlawb.git.store import (
    BlobTooLarge,
    InvalidName,
    RepositoryExists,
    RepositoryNotFound,
    RepositoryStore,
)

pytestmark = pytest.mark.integration

REACTOR: IReactorProcess = reactor  # type: ignore[assignment]

OWNER = "z6MkehRgf7yJbgaGfYsdoAsKdBPE3dj2CYhowQdcjqSJgvVd"
OTHER = "z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp"

GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Ada",
    "GIT_AUTHOR_EMAIL": "ada@example.invalid",
    "GIT_AUTHOR_DATE": "1700000000 +0200",
    "GIT_COMMITTER_NAME": "Ada",
    "GIT_COMMITTER_EMAIL": "ada@example.invalid",
}


def git(*args: str, cwd: Path | None = None) -> str:
    """
    Run git synchronously for test set-up.
    """
    return subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True
    ).stdout.decode()


class StoreTests(TestCase):
    """
    RepositoryStore with real git on the global reactor.
    """

    def setUp(self) -> None:
        self.base = Path(tempfile.mkdtemp())
        self.addCleanup(subprocess.run, ["rm", "-rf", str(self.base)])
        self.store = RepositoryStore(self.base / "repos", REACTOR)

    def push_history(self, repo: Path, branch: str = "main") -> list[str]:
        """
        Push two commits (a file and a directory) to a repository; return
        their ids, newest first.
        """
        work = self.base / "work"
        git("init", "-q", "-b", branch, str(work))
        (work / "README").write_text("hello\n")
        git("add", "README", cwd=work)
        git("commit", "-q", "-m", "first", cwd=work)
        (work / "src").mkdir()
        (work / "src" / "main.py").write_text("print('hi')\n")
        git("add", "src", cwd=work)
        git("commit", "-q", "-m", "second\n\nwith a body", cwd=work)
        git("tag", "v1", cwd=work)
        git("push", "-q", str(repo), branch, "v1", cwd=work)
        return git("rev-list", "HEAD", cwd=work).split()

    def config(self, repo: Path, key: str) -> str:
        """
        One config value of a repository.
        """
        return git("config", "--get", key, cwd=repo).strip()

    async def test_create_bare(self) -> None:
        """A new repository is bare, names its default branch, has the config."""
        path = await self.store.create_bare(OWNER, "demo", "trunk")

        self.assertEqual(path, self.store.root / OWNER / "demo.git")
        self.assertEqual((path / "HEAD").read_text(), "ref: refs/heads/trunk\n")
        self.assertEqual(self.config(path, "core.bare"), "true")
        self.assertEqual(self.config(path, "receive.fsckObjects"), "true")
        self.assertEqual(self.config(path, "uploadpack.allowFilter"), "true")
        self.assertFalse((path / "hooks").exists())
        self.assertTrue(self.store.exists(OWNER, "demo.git"))
        self.assertEqual(os.listdir(path.parent), ["demo.git"])

    async def test_create_existing_is_refused(self) -> None:
        """Creating a repository twice raises RepositoryExists."""
        await self.store.create_bare(OWNER, "demo")

        with self.assertRaises(RepositoryExists):
            await self.store.create_bare(OWNER, "demo.git")
        self.assertEqual(os.listdir(self.store.root / OWNER), ["demo.git"])

    async def test_create_with_bad_branch_is_refused(self) -> None:
        """An invalid default branch is refused before anything is made."""
        with self.assertRaises(InvalidName):
            await self.store.create_bare(OWNER, "demo", "bad..branch")

        self.assertFalse((self.store.root / OWNER).exists())

    async def test_remove(self) -> None:
        """remove deletes the repository, and reports when there was none."""
        path = await self.store.create_bare(OWNER, "demo")

        first = self.store.remove(OWNER, "demo")
        second = self.store.remove(OWNER, "demo")

        self.assertEqual((first, second), (True, False))
        self.assertFalse(path.exists())
        self.assertEqual(os.listdir(path.parent), [])

    async def test_fork_copies_refs_and_head(self) -> None:
        """A fork has the source's refs and HEAD, and no remote."""
        src = await self.store.create_bare(OWNER, "demo", "trunk")
        self.push_history(src, "trunk")

        dst = await self.store.fork(OWNER, "demo", OTHER, "copy")

        self.assertEqual(
            await self.store.list_refs(dst), await self.store.list_refs(src)
        )
        self.assertEqual(await self.store.head_ref(dst), "refs/heads/trunk")
        remotes = subprocess.run(
            ["git", "config", "--get-regexp", "^remote\\."],
            cwd=dst,
            env=GIT_ENV,
            capture_output=True,
        )
        self.assertEqual(remotes.stdout, b"")
        self.assertEqual(self.config(dst, "receive.fsckObjects"), "true")

    async def test_fork_of_empty_repository_keeps_head(self) -> None:
        """Forking an empty repository keeps its default branch."""
        await self.store.create_bare(OWNER, "empty", "develop")

        dst = await self.store.fork(OWNER, "empty", OWNER, "empty-fork")

        self.assertEqual(await self.store.head_ref(dst), "refs/heads/develop")

    async def test_fork_missing_source(self) -> None:
        """Forking a repository that does not exist raises."""
        with self.assertRaises(RepositoryNotFound):
            await self.store.fork(OWNER, "nope", OTHER, "copy")

    async def test_fork_onto_existing(self) -> None:
        """Forking onto an existing repository raises."""
        await self.store.create_bare(OWNER, "a")
        await self.store.create_bare(OTHER, "b")

        with self.assertRaises(RepositoryExists):
            await self.store.fork(OWNER, "a", OTHER, "b")

    async def test_list_refs(self) -> None:
        """list_refs gives every ref with its object id."""
        repo = await self.store.create_bare(OWNER, "demo")
        commits = self.push_history(repo)

        refs = dict(await self.store.list_refs(repo))

        self.assertEqual(refs["refs/heads/main"], commits[0])
        self.assertEqual(set(refs), {"refs/heads/main", "refs/tags/v1"})

    async def test_commit_and_branch_existence(self) -> None:
        """Commits and branches are found; unknown ones are not."""
        repo = await self.store.create_bare(OWNER, "demo")
        commits = self.push_history(repo)

        self.assertEqual(await self.store.resolve_commit(repo, "main"), commits[0])
        self.assertTrue(await self.store.commit_exists(repo, commits[1][:10]))
        self.assertFalse(await self.store.commit_exists(repo, "f" * 40))
        self.assertTrue(await self.store.branch_exists(repo, "main"))
        self.assertFalse(await self.store.branch_exists(repo, "v1"))

    async def test_commits(self) -> None:
        """commits lists newest first with author, UTC date and subject."""
        repo = await self.store.create_bare(OWNER, "demo")
        ids = self.push_history(repo)

        commits = await self.store.commits(repo, "main", limit=10)

        self.assertEqual([c["hash"] for c in commits], ids)
        self.assertEqual(commits[0]["message"], "second")
        self.assertEqual(commits[0]["author"], "Ada")
        self.assertEqual(commits[0]["date"], "2023-11-14T22:13:20.000000+00:00")

    async def test_commits_limit_and_default_head(self) -> None:
        """Without a branch HEAD is used, and the limit is honoured."""
        repo = await self.store.create_bare(OWNER, "demo")
        ids = self.push_history(repo)

        commits = await self.store.commits(repo, None, limit=1)

        self.assertEqual([c["hash"] for c in commits], ids[:1])

    async def test_commits_of_empty_repository(self) -> None:
        """An empty repository has no commits."""
        repo = await self.store.create_bare(OWNER, "demo")

        self.assertEqual(await self.store.commits(repo), [])

    async def test_commits_refuse_options(self) -> None:
        """A branch that looks like an option is refused."""
        repo = await self.store.create_bare(OWNER, "demo")

        with self.assertRaises(InvalidName):
            await self.store.commits(repo, "--output=/tmp/x")

    async def test_tree_root_and_subdirectory(self) -> None:
        """tree lists entries with sizes for blobs only."""
        repo = await self.store.create_bare(OWNER, "demo")
        self.push_history(repo)

        root = await self.store.tree(repo, "main")
        sub = await self.store.tree(repo, "main", "/src/")

        assert root is not None and sub is not None
        self.assertEqual(
            [(e["name"], e["type"]) for e in root],
            [
                ("README", "blob"),
                ("src", "tree"),
            ],
        )
        self.assertEqual(root[0]["size"], 6)
        self.assertIsNone(root[1]["size"])
        self.assertEqual(sub[0]["name"], "main.py")
        self.assertEqual(sub[0]["mode"], "100644")
        self.assertTrue(re.fullmatch("[0-9a-f]{40}", sub[0]["hash"]))

    async def test_tree_missing(self) -> None:
        """A missing revision, directory, or a file path gives None."""
        repo = await self.store.create_bare(OWNER, "demo")
        self.push_history(repo)

        self.assertIsNone(await self.store.tree(repo, "nope"))
        self.assertIsNone(await self.store.tree(repo, "main", "nope"))
        self.assertIsNone(await self.store.tree(repo, "main", "README"))

    async def test_blob(self) -> None:
        """blob returns a file's bytes at a revision."""
        repo = await self.store.create_bare(OWNER, "demo")
        ids = self.push_history(repo)

        content = await self.store.blob(repo, "main", "src/main.py")
        older = await self.store.blob(repo, ids[1], "src/main.py")

        self.assertEqual(content, b"print('hi')\n")
        self.assertIsNone(older)

    async def test_blob_not_a_file(self) -> None:
        """A directory, a missing path or the root is not a blob."""
        repo = await self.store.create_bare(OWNER, "demo")
        self.push_history(repo)

        self.assertIsNone(await self.store.blob(repo, "main", "src"))
        self.assertIsNone(await self.store.blob(repo, "main", "src/nope"))
        self.assertIsNone(await self.store.blob(repo, "main", ""))

    async def test_blob_paths_are_literal(self) -> None:
        """Glob characters in a path match nothing but themselves."""
        repo = await self.store.create_bare(OWNER, "demo")
        self.push_history(repo)

        self.assertIsNone(await self.store.blob(repo, "main", "src/*.py"))

    async def test_blob_too_large(self) -> None:
        """A blob above the limit raises BlobTooLarge."""
        repo = await self.store.create_bare(OWNER, "demo")
        self.push_history(repo)

        with self.assertRaises(BlobTooLarge):
            await self.store.blob(repo, "main", "README", max_bytes=3)

    async def test_stale_locks_removed(self) -> None:
        """Old lock files and quarantine directories are removed."""
        repo = await self.store.create_bare(OWNER, "demo")
        self.push_history(repo)
        stale = [
            repo / "HEAD.lock",
            repo / "packed-refs.lock",
            repo / "refs" / "heads" / "main.lock",
            repo / "objects" / "incoming-abc123",
            repo / "objects" / "tmp_objdir-incoming-xyz",
        ]
        for path in stale[:3]:
            path.write_text("")
        for path in stale[3:]:
            path.mkdir()
            (path / "pack").mkdir()
        fresh = repo / "config.lock"
        fresh.write_text("")
        for path in [*stale, *(p / "pack" for p in stale[3:])]:
            os.utime(path, (1000, 1000))

        removed = self.store.clean_stale_locks(repo, older_than=600, now=5000)

        self.assertEqual(sorted(removed), sorted(stale))
        self.assertFalse(any(p.exists() for p in stale))
        self.assertTrue(fresh.exists())
        self.assertEqual(await self.store.head_ref(repo), "refs/heads/main")

    async def test_stale_locks_kept_while_repository_in_use(self) -> None:
        """Nothing is removed while a process works inside the repository."""
        repo = await self.store.create_bare(OWNER, "demo")
        lock = repo / "HEAD.lock"
        lock.write_text("")
        os.utime(lock, (1000, 1000))
        sleeper = subprocess.Popen(["sleep", "30"], cwd=repo)
        try:
            removed = self.store.clean_stale_locks(repo, older_than=600, now=5000)
        finally:
            sleeper.kill()
            sleeper.wait()

        self.assertEqual(removed, [])
        self.assertTrue(lock.exists())

    async def test_stale_temp_dirs_removed(self) -> None:
        """Leftover staging and trash directories are removed when old."""
        await self.store.create_bare(OWNER, "demo")
        owner = self.store.root / OWNER
        old, new = owner / ".tmp-old", owner / ".trash-new"
        old.mkdir()
        new.mkdir()
        os.utime(old, (1000, 1000))

        removed = self.store.clean_stale_temp_dirs(older_than=600, now=5000)

        self.assertEqual(removed, [old])
        self.assertTrue(new.exists())
        self.assertTrue((owner / "demo.git").exists())

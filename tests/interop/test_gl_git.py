"""
The real C{git-remote-gitlawb} 0.7.1 against a real node (C{twistd -n
gitlawb}): a repository with hundreds of commits, several branches and tags
goes up with C{git push gitlawb://...} and comes back identical, with the
helper and with plain git over HTTP; what the helper cannot do (shallow
clones, delete-only pushes) fails at once instead of hanging.

Git runs in the closed environment of L{gl_env}, which puts the helper on
C{PATH}; every git command has a timeout, so a hang fails the test.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.interop.glclient import NPM_MISSING_REASON, GlUser, gl_binaries
from tests.support import NodeProcess

pytestmark = pytest.mark.interop

StartNode = Callable[..., NodeProcess]

#: No git or gl command may take longer: a hang fails the test.
TIMEOUT = 120

#: What the helper cannot do must fail well within this.
FAIL_FAST_SECONDS = 15

MAIN_COMMITS = 200


# -- helpers -----------------------------------------------------------------


def build_history(user: GlUser, path: Path) -> None:
    """
    Write a repository with fast-import: C{MAIN_COMMITS} commits on C{main}
    over a dozen files (text, a binary of half a megabyte changed twice, an
    executable, a symbolic link, a non-ASCII name), a C{dev} branch merged
    back into C{main}, an unmerged C{feature/x}, and lightweight and
    annotated tags.
    """
    rng = random.Random(7)
    stream: list[bytes] = []
    marks = 0

    def blob(data: bytes) -> int:
        nonlocal marks
        marks += 1
        stream.append(b"blob\nmark :%d\ndata %d\n%s\n" % (marks, len(data), data))
        return marks

    def commit(
        branch: str,
        message: str,
        files: dict[str, tuple[str, int]],
        parents: tuple[int, ...] = (),
    ) -> int:
        nonlocal marks
        marks += 1
        when = 1_700_000_000 + marks * 60
        who = b"Interop Tester <interop@gitlawb.invalid> %d +0000" % when
        body = message.encode()
        lines = [
            b"commit refs/heads/" + branch.encode(),
            b"mark :%d" % marks,
            b"author " + who,
            b"committer " + who,
            b"data %d" % len(body),
            body,
        ]
        if parents:
            lines.append(b"from :%d" % parents[0])
            lines.extend(b"merge :%d" % p for p in parents[1:])
        for name, (mode, mark) in files.items():
            lines.append(f"M {mode} :{mark} {name}".encode())
        stream.append(b"\n".join(lines) + b"\n\n")
        return marks

    def text(seed: int, lines: int) -> bytes:
        return "".join(
            f"line {seed}.{n}: {rng.random():.12f}\n" for n in range(lines)
        ).encode()

    first = {
        "README.md": ("100644", blob(b"# interop\n")),
        "bin/run.sh": ("100755", blob(b"#!/bin/sh\necho run\n")),
        "link": ("120000", blob(b"README.md")),
        "docs/caf\u00e9.md": ("100644", blob("caf\u00e9 \u2615\n".encode())),
    }
    main = commit("main", "initial commit\n", first)
    tips: dict[int, int] = {}
    for number in range(1, MAIN_COMMITS):
        changed = {
            f"src/module_{number % 9}.py": ("100644", blob(text(number, 40))),
            "CHANGELOG": ("100644", blob(text(number, number % 50 + 1))),
        }
        if number in (50, 150):
            data = rng.randbytes(512 * 1024)
            changed["data/blob.bin"] = ("100644", blob(data))
        main = commit(
            "main", f"change {number}\n\nBody of change {number}.\n", changed, (main,)
        )
        tips[number] = main

    dev = tips[120]
    dev_files: dict[str, tuple[str, int]] = {}
    for number in range(20):
        file = {f"dev/note_{number}.txt": ("100644", blob(text(1000 + number, 5)))}
        dev = commit("dev", f"dev work {number}\n", file, (dev,))
        dev_files.update(file)
    feature = tips[180]
    for number in range(5):
        file = {"feature.txt": ("100644", blob(text(2000 + number, 8)))}
        feature = commit("feature/x", f"feature {number}\n", file, (feature,))
    main = commit("main", "merge dev\n", dev_files, (main, dev))

    tagger = b"Interop Tester <interop@gitlawb.invalid> 1700100000 +0000"
    message = b"release 1.0\n"
    stream.append(
        b"tag v1.0\nfrom :%d\ntagger %s\ndata %d\n%s\n"
        % (main, tagger, len(message), message)
    )
    stream.append(b"reset refs/tags/v0.1\nfrom :%d\n\n" % tips[50])
    stream.append(b"reset refs/tags/dev-snapshot\nfrom :%d\n\n" % dev)

    user.git("init", "-q", "-b", "main", str(path))
    user.run("git", "fast-import", "--quiet", cwd=path, input=b"".join(stream))
    user.git("reset", "-q", "--hard", "main", cwd=path)


def published_refs(user: GlUser, repo: Path) -> dict[str, str]:
    """
    The branches and tags of a source repository, C{refname -> object}.
    """
    output = user.git(
        "for-each-ref",
        "--format=%(refname) %(objectname)",
        "refs/heads",
        "refs/tags",
        cwd=repo,
    )
    return dict(line.split() for line in output.splitlines())


def cloned_refs(user: GlUser, clone: Path) -> dict[str, str]:
    """
    The refs of a clone, with its remote-tracking branches named as the
    branches they track.
    """
    output = user.git("for-each-ref", "--format=%(refname) %(objectname)", cwd=clone)
    found = {}
    for name, sha in (line.split() for line in output.splitlines()):
        if name.startswith("refs/remotes/origin/"):
            branch = name.removeprefix("refs/remotes/origin/")
            if branch != "HEAD":
                found[f"refs/heads/{branch}"] = sha
        elif name.startswith("refs/tags/"):
            found[name] = sha
    return found


def served_refs(user: GlUser, url: str) -> dict[str, str]:
    output = user.git("ls-remote", "--refs", url)
    return {
        name: sha for sha, name in (line.split("\t") for line in output.splitlines())
    }


def all_objects(user: GlUser, repo: Path) -> list[str]:
    return sorted(user.git("rev-list", "--all", "--objects", cwd=repo).splitlines())


# -- fixtures ----------------------------------------------------------------


@dataclass
class Setup:
    user: GlUser
    source: Path
    remote: str
    http_url: str


@pytest.fixture
def setup(start_node: StartNode, tmp_path: Path) -> Setup:
    """
    A registered user with an empty repository C{big} on a node, and the
    history to push to it in C{source}.
    """
    if gl_binaries() is None:
        pytest.skip(NPM_MISSING_REASON)
    node = start_node(name="a")
    user = GlUser(tmp_path / "home", node)
    user.home.mkdir()
    created = user.run("gl", "identity", "new").stdout
    user.did = next(w for w in created.split() if w.startswith("did:key:"))
    user.run("gl", "register")
    user.run("gl", "repo", "create", "big")
    source = tmp_path / "source"
    build_history(user, source)
    return Setup(
        user,
        source,
        f"gitlawb://{user.did}/big",
        f"{node.url}/{user.short}/big.git",
    )


@pytest.fixture
def pushed(setup: Setup) -> Setup:
    """
    The same, with every branch and tag pushed with the helper.
    """
    setup.user.git("push", "-q", setup.remote, "--all", cwd=setup.source)
    setup.user.git("push", "-q", setup.remote, "--tags", cwd=setup.source)
    return setup


# -- tests -------------------------------------------------------------------


def test_source_history_shape(setup: Setup) -> None:
    """The generated history has the commits, branches and tags the tests rely on."""
    user = setup.user

    count = int(user.git("rev-list", "--count", "--all", cwd=setup.source))
    refs = published_refs(user, setup.source)

    assert count == MAIN_COMMITS + 20 + 5 + 1
    assert set(refs) == {
        "refs/heads/main",
        "refs/heads/dev",
        "refs/heads/feature/x",
        "refs/tags/v1.0",
        "refs/tags/v0.1",
        "refs/tags/dev-snapshot",
    }


def test_push_all_and_tags(pushed: Setup) -> None:
    """C{git push --all} and C{--tags} through the helper put every ref on the node."""
    user = pushed.user

    served = served_refs(user, pushed.http_url)

    assert served == published_refs(user, pushed.source)


def test_clone_with_helper_is_identical(pushed: Setup, tmp_path: Path) -> None:
    """C{git clone gitlawb://...} brings back the same refs, tree and objects."""
    user = pushed.user
    clone = tmp_path / "clone"

    user.git("clone", "-q", pushed.remote, str(clone))

    assert cloned_refs(user, clone) == published_refs(user, pushed.source)
    assert user.git("rev-parse", "HEAD^{tree}", cwd=clone) == user.git(
        "rev-parse", "main^{tree}", cwd=pushed.source
    )
    assert user.git("symbolic-ref", "HEAD", cwd=clone).strip() == "refs/heads/main"
    assert all_objects(user, clone) == all_objects(user, pushed.source)
    user.git("fsck", "--strict", "--no-progress", cwd=clone)


def test_plain_http_clone_is_identical(pushed: Setup, tmp_path: Path) -> None:
    """Plain C{git clone http://node/<short>/<repo>.git} brings back the same refs."""
    user = pushed.user
    clone = tmp_path / "clone"

    user.git("clone", "-q", pushed.http_url, str(clone))

    assert cloned_refs(user, clone) == published_refs(user, pushed.source)
    assert user.git("rev-parse", "HEAD^{tree}", cwd=clone) == user.git(
        "rev-parse", "main^{tree}", cwd=pushed.source
    )
    assert all_objects(user, clone) == all_objects(user, pushed.source)


def test_incremental_push(pushed: Setup) -> None:
    """A later push with the helper sends only the new commits and moves the ref."""
    user = pushed.user
    for number in range(3):
        (pushed.source / f"later-{number}.txt").write_text(f"later {number}\n")
        user.git("add", ".", cwd=pushed.source)
        user.git("commit", "-q", "-m", f"later {number}", cwd=pushed.source)

    user.git("push", "-q", pushed.remote, "main", cwd=pushed.source)

    head = user.git("rev-parse", "main", cwd=pushed.source).strip()
    assert served_refs(user, pushed.http_url)["refs/heads/main"] == head


def test_shallow_clone_fails_fast(pushed: Setup, tmp_path: Path) -> None:
    """C{git clone --depth 1 gitlawb://...} fails at once, saying why."""
    started = time.monotonic()

    result = pushed.user.run(
        "git",
        "clone",
        "--depth",
        "1",
        pushed.remote,
        str(tmp_path / "shallow"),
        check=False,
        timeout=60,
    )

    assert result.returncode != 0
    assert time.monotonic() - started < FAIL_FAST_SECONDS
    assert "Server does not support shallow clients" in result.stderr


def test_delete_only_push_fails_fast(pushed: Setup) -> None:
    """A delete-only push fails at once, saying why, and deletes nothing."""
    user = pushed.user
    started = time.monotonic()

    result = user.run(
        "git",
        "push",
        pushed.remote,
        "--delete",
        "feature/x",
        cwd=pushed.source,
        check=False,
        timeout=60,
    )

    assert result.returncode != 0
    assert time.monotonic() - started < FAIL_FAST_SECONDS
    assert "remote does not support deleting refs" in result.stderr
    assert "refs/heads/feature/x" in served_refs(user, pushed.http_url)

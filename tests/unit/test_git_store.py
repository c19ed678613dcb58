"""Unit tests for the validation in gitlawb.git.store."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import base58
import pytest
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.task import Clock

from gitlawb.git.store import (
    InvalidName,
    RepositoryStore,
    owner_short_key,
    validate_branch_name,
    validate_owner_key,
    validate_repo_name,
    validate_revision,
    validate_tree_path,
)

# The DID of the seed 0x00..0x1f (PROTOCOL.md, section 2).
OWNER = "z6MkehRgf7yJbgaGfYsdoAsKdBPE3dj2CYhowQdcjqSJgvVd"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("demo", "demo"),
        ("demo.git", "demo"),
        ("my.repo", "my.repo"),
        ("A_b-1", "A_b-1"),
        ("x" * 100, "x" * 100),
        ("x" * 100 + ".git", "x" * 100),
    ],
)
def test_valid_repo_names(name: str, expected: str) -> None:
    """Valid names pass, losing one .git suffix."""
    assert validate_repo_name(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".git",
        ".hidden",
        "a..b",
        "..",
        "a.git.git",
        "trailing.",
        "a/b",
        "a\\b",
        "a b",
        "ü",
        "x" * 101,
        "a\0b",
    ],
)
def test_invalid_repo_names(name: str) -> None:
    """Names outside the allowed alphabet or shape are refused."""
    with pytest.raises(InvalidName):
        validate_repo_name(name)


def test_owner_key_accepts_ed25519_did_key() -> None:
    """The short form of an Ed25519 did:key passes unchanged."""
    assert validate_owner_key(OWNER) == OWNER


def test_owner_short_key_accepts_full_did() -> None:
    """A full did:key is reduced to its short form."""
    assert owner_short_key(f"did:key:{OWNER}") == OWNER


@pytest.mark.parametrize(
    "owner",
    [
        "",
        "..",
        f"did:key:{OWNER}",
        OWNER[:-1] + "0",
        OWNER[:-1] + "l",
        OWNER + "/..",
        OWNER[:20],
        "z" + base58.b58encode(b"\xe7\x01" + bytes(33)).decode(),
        "z6Mk" + "1" * 44,
    ],
)
def test_invalid_owner_keys(owner: str) -> None:
    """Anything but an Ed25519 did:key short form is refused."""
    with pytest.raises(InvalidName):
        validate_owner_key(owner)


@pytest.mark.parametrize("branch", ["main", "feature/x", "v1.0", "a-b_c"])
def test_valid_branch_names(branch: str) -> None:
    """Ordinary branch names pass."""
    assert validate_branch_name(branch) == branch


@pytest.mark.parametrize(
    "branch",
    [
        "",
        "-x",
        "HEAD",
        "@",
        "a..b",
        "a.lock",
        "a/.b",
        "a b",
        "a~1",
        "a^",
        "a:b",
        "a?",
        "a*",
        "a[",
        "a\\b",
        "a/",
        "/a",
        "a//b",
        "a.",
        "x@{1}",
        "a\x7f",
    ],
)
def test_invalid_branch_names(branch: str) -> None:
    """Names git-check-ref-format --branch refuses are refused."""
    with pytest.raises(InvalidName):
        validate_branch_name(branch)


@pytest.mark.parametrize(
    "revision", ["HEAD", "main", "refs/heads/main", "v1.0", "abcd", "a" * 40]
)
def test_valid_revisions(revision: str) -> None:
    """Hex ids, HEAD and ref names pass."""
    assert validate_revision(revision) == revision


@pytest.mark.parametrize(
    "revision", ["", "-n", "--output=x", "main~1", "HEAD^", "a:b", "@{-1}", "a..b"]
)
def test_invalid_revisions(revision: str) -> None:
    """Options and revision expressions are refused."""
    with pytest.raises(InvalidName):
        validate_revision(revision)


@pytest.mark.parametrize(
    ("path", "expected"),
    [("", ""), ("/", ""), ("a/b/", "a/b"), ("/src/main.py", "src/main.py")],
)
def test_valid_tree_paths(path: str, expected: str) -> None:
    """Paths are normalised by dropping outer slashes."""
    assert validate_tree_path(path) == expected


@pytest.mark.parametrize("path", ["../x", "a/./b", "a//b", "a/..", "a\0b", "a\nb"])
def test_invalid_tree_paths(path: str) -> None:
    """Dot components, empty components, NUL and newline are refused."""
    with pytest.raises(InvalidName):
        validate_tree_path(path)


def store(root: Path) -> RepositoryStore:
    """
    A store whose reactor is never used by these tests.
    """
    return RepositoryStore(root, cast(IReactorProcess, Clock()))


def test_path_for_layout(tmp_path: Path) -> None:
    """Repositories live at <root>/<owner>/<name>.git."""
    path = store(tmp_path).path_for(OWNER, "demo.git")

    assert path == tmp_path.resolve() / OWNER / "demo.git"


def test_path_for_refuses_escape(tmp_path: Path) -> None:
    """A name that would leave the root is refused."""
    with pytest.raises(InvalidName):
        store(tmp_path).path_for(OWNER, "../../etc")


def test_path_for_refuses_symlinked_owner(tmp_path: Path) -> None:
    """An owner directory that links outside the root is refused."""
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / OWNER).symlink_to(tmp_path)

    with pytest.raises(InvalidName):
        store(tmp_path / "root").path_for(OWNER, "demo")

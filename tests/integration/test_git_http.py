"""Git smart HTTP (PROTOCOL.md sections 6-7) against a real node and real git.

Every test starts its own node (C{twistd -n gitlawb}) on a fresh database and
drives it with the git command line: reads go straight to the node, pushes go
through L{SigningProxy}, which signs each request as git-remote-gitlawb does.
The slow tests (thousands of tags, timeouts, crashes) come last.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from gitlawb.git.pktline import FLUSH, PktLineReader, Special, encode
from gitlawb.identity.tokens import verify_certificate
from tests.signing_proxy import SigningProxy
from tests.support import GIT_ENV, Agent, NodeProcess, request

pytestmark = pytest.mark.integration

StartNode = Callable[..., NodeProcess]

ZERO = "0" * 40

# -- helpers -----------------------------------------------------------------


def git(
    *args: str,
    cwd: Path | None = None,
    check: bool = True,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """
    Run git and return what it did (text output); raise when C{check} and it
    failed.
    """
    result = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**GIT_ENV, **(env or {})},
        input=input,
        capture_output=True,
        timeout=timeout,
    )
    done = subprocess.CompletedProcess(
        result.args,
        result.returncode,
        result.stdout.decode("utf-8", "replace"),
        result.stderr.decode("utf-8", "replace"),
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"git {' '.join(args)} exited {result.returncode}:\n{done.stderr}"
        )
    return done


def git_popen(*args: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """
    Start git in the background (stdout and stderr captured).
    """
    return subprocess.Popen(
        ["git", *args],
        cwd=cwd,
        env=GIT_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@dataclass
class Repo:
    """
    A repository hosted by a node under test.
    """

    node: NodeProcess
    owner: Agent
    name: str
    id: str
    path: Path

    @property
    def short(self) -> str:
        return self.owner.did.rsplit(":", 1)[1]

    @property
    def route(self) -> str:
        return f"/{self.short}/{self.name}.git"

    @property
    def url(self) -> str:
        return self.node.url + self.route

    def via(self, proxy: SigningProxy) -> str:
        return proxy.url + self.route

    def refs(self) -> dict[str, str]:
        """
        The refs on disk, read with git itself.
        """
        out = git("for-each-ref", "--format=%(refname) %(objectname)", cwd=self.path)
        pairs = (line.split(" ", 1) for line in out.stdout.splitlines())
        return {name: sha for name, sha in pairs}


@contextmanager
def database(node: NodeProcess) -> Iterator[Any]:
    """
    An autocommit psycopg2 cursor on the node's own database.
    """
    connection = psycopg2.connect(node.env["DATABASE_URL"])
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            yield cursor
    finally:
        connection.close()


def query(node: NodeProcess, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
    with database(node) as cursor:
        cursor.execute(sql, args)
        return list(cursor.fetchall())


def create_repo(
    node: NodeProcess, owner: Agent, name: str, *, public: bool = True
) -> Repo:
    """
    Create a repository with a signed C{POST /api/v1/repos}, as C{gl repo
    create} does.
    """
    answer = owner.call(
        node, "POST", "/api/v1/repos", {"name": name, "is_public": public}
    )
    assert answer.status == 201, answer
    created = answer.json()
    short = owner.did.rsplit(":", 1)[1]
    assert created["clone_url"].endswith(f"/{short}/{name}.git")
    path = node.data_dir / "repos" / short / f"{name}.git"
    assert (path / "HEAD").is_file()
    return Repo(node, owner, name, created["id"], path)


def work_repo(path: Path) -> Path:
    """
    A new, empty non-bare repository to commit in.
    """
    git("init", "-q", "-b", "main", str(path))
    return path


def add_commits(
    repo: Path,
    count: int,
    label: str,
    branch: str = "main",
    *,
    size: int = 64,
) -> str:
    """
    Add C{count} commits on C{branch} (each changing one file of about
    C{size} bytes) with C{git fast-import}, which is much faster than a
    commit loop; return the new tip.
    """
    ref = f"refs/heads/{branch}"
    parent = git("rev-parse", "-q", "--verify", ref, cwd=repo, check=False).stdout
    lines: list[bytes] = []
    for i in range(count):
        message = f"{label} {i}\n".encode()
        content = (f"{label} {i}\n" * (size // 8 + 1)).encode()[:size]
        lines.append(f"commit {ref}\n".encode())
        lines.append(f"committer Test <t@e> {1_700_000_000 + i} +0000\n".encode())
        lines.append(b"data %d\n%s" % (len(message), message))
        if i == 0 and parent.strip():
            lines.append(f"from {parent.strip()}\n".encode())
        lines.append(f"M 644 inline {label}.txt\n".encode())
        lines.append(b"data %d\n%s\n" % (len(content), content))
    git("fast-import", "--quiet", cwd=repo, input=b"".join(lines))
    return git("rev-parse", ref, cwd=repo).stdout.strip()


def pkt_lines(data: bytes) -> list[bytes | Special]:
    """
    Split a pkt-line stream (which must be whole).
    """
    return list(PktLineReader().feed(data))


def pids_with(marker: str) -> list[int]:
    """
    The live processes whose command line contains C{marker}.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def wait_for(
    condition: Callable[[], Any], timeout: float = 20, what: str = "condition"
) -> Any:
    """
    Poll C{condition} until it returns something true; return that.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def stalling_hook(repo: Repo, marker: str, flag: Path | None = None) -> None:
    """
    Install a pre-receive hook that sleeps 100 s (as C{sleep 100.<marker>},
    so the process can be found); with C{flag}, only while that file exists.
    """
    hook = repo.path / "hooks" / "pre-receive"
    hook.parent.mkdir(exist_ok=True)
    condition = f'[ -e "{flag}" ] || exit 0\n' if flag else ""
    hook.write_text(f"#!/bin/sh\ncat >/dev/null\n{condition}exec sleep 100.{marker}\n")
    hook.chmod(0o755)


def git_children(repo: Path) -> list[int]:
    """
    The live processes working in C{repo} (git and what it started).
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "cwd") != str(repo):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


def new_marker() -> str:
    """
    A unique all-digits marker (so that C{sleep 100.<marker>} stays valid).
    """
    return str(uuid.uuid4().int)[:18]


# -- clone and fetch ---------------------------------------------------------


def test_clone_empty_repository(start_node: StartNode, tmp_path: Path) -> None:
    """Cloning an empty repository over HTTP gives an empty clone."""
    node = start_node()
    repo = create_repo(node, Agent(), "empty")

    result = git("clone", repo.url, str(tmp_path / "clone"))

    assert "empty repository" in result.stderr
    assert git("for-each-ref", cwd=tmp_path / "clone").stdout == ""


@pytest.mark.parametrize("version", ["0", "2"])
@pytest.mark.parametrize("commits", [1, 10])
def test_shallow_clone(
    start_node: StartNode, tmp_path: Path, commits: int, version: str
) -> None:
    """A --depth 1 clone (protocol v0 or v2) holds the tip commit only."""
    node = start_node()
    agent = Agent()
    repo = create_repo(node, agent, "shallow")
    work = work_repo(tmp_path / "work")
    tip = add_commits(work, commits, "c")
    with SigningProxy(node.url, agent.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", cwd=work)

    git(
        "-c", f"protocol.version={version}",
        "clone", "-q", "--depth", "1", repo.url, str(tmp_path / "clone"),
    )  # fmt: skip

    clone = tmp_path / "clone"
    assert git("rev-parse", "HEAD", cwd=clone).stdout.strip() == tip
    assert git("rev-list", "--count", "HEAD", cwd=clone).stdout.strip() == "1"
    assert (clone / ".git" / "shallow").read_text().strip() == tip


@pytest.mark.parametrize("version", ["0", "2"])
def test_fetch_needs_several_negotiation_rounds(
    start_node: StartNode, tmp_path: Path, version: str
) -> None:
    """A fetch whose client and server histories diverged by hundreds of
    commits negotiates over several POSTs and ends with both histories."""
    node = start_node()
    agent = Agent()
    repo = create_repo(node, agent, "negotiate")
    seed = work_repo(tmp_path / "seed")
    base = add_commits(seed, 3, "base")
    ours_dir = tmp_path / "ours"
    with SigningProxy(node.url, agent.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", cwd=seed)
        git("clone", "-q", repo.url, str(ours_dir))
        # Someone else pushes many commits on top of the base...
        theirs = add_commits(seed, 300, "theirs")
        git("push", "-q", repo.via(proxy), "main", cwd=seed)
    # ... while our clone gains as many of its own.
    ours = add_commits(ours_dir, 300, "ours")

    with SigningProxy(node.url, None) as counter:
        url = repo.via(counter)
        result = git(
            "-c",
            f"protocol.version={version}",
            "fetch",
            url,
            "+refs/heads/main:refs/remotes/origin/main",
            cwd=ours_dir,
            env={"GIT_TRACE_PACKET": "1"},
        )
        posts = [r for r in counter.requests if r[1].endswith("/git-upload-pack")]

    assert git("rev-parse", "origin/main", cwd=ours_dir).stdout.strip() == theirs
    assert git("merge-base", ours, theirs, cwd=ours_dir).stdout.strip() == base
    git("fsck", "--no-progress", cwd=ours_dir)
    assert len(posts) > 2, posts
    # Each round's haves reached git: the node streamed every request whole.
    assert result.stderr.count("> have ") >= 300


def test_protocol_v2_clone_and_fetch(start_node: StartNode, tmp_path: Path) -> None:
    """With protocol.version=2 the node passes Git-Protocol on to git: clone
    and fetch speak v2 end to end."""
    node = start_node()
    agent = Agent()
    repo = create_repo(node, agent, "v2")
    work = work_repo(tmp_path / "work")
    add_commits(work, 5, "a")
    with SigningProxy(node.url, agent.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", cwd=work)
    v2 = ["-c", "protocol.version=2"]
    trace = {"GIT_TRACE_PACKET": "1"}

    clone = git(*v2, "clone", repo.url, str(tmp_path / "clone"), env=trace)
    tip = add_commits(work, 5, "b")
    with SigningProxy(node.url, agent.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", cwd=work)
    fetch = git(*v2, "fetch", "origin", cwd=tmp_path / "clone", env=trace)
    advertised = request(
        "GET",
        repo.url + "/info/refs?service=git-upload-pack",
        headers={"Git-Protocol": "version=2"},
    )

    assert "clone< version 2" in clone.stderr
    assert "clone> command=fetch" in clone.stderr
    assert "fetch< version 2" in fetch.stderr
    assert "fetch> command=fetch" in fetch.stderr
    assert git("rev-parse", "origin/main", cwd=tmp_path / "clone").stdout.strip() == tip
    lines = pkt_lines(advertised.body)
    assert lines[:3] == [
        b"# service=git-upload-pack\n",
        Special.FLUSH,
        b"version 2\n",
    ]
    # ref-in-want stays off (see smart_http.UPLOAD_PACK_CONFIG).
    fetch_line = next(
        x for x in lines if isinstance(x, bytes) and x.startswith(b"fetch=")
    )
    assert b"ref-in-want" not in fetch_line


def test_unusable_git_protocol_header_falls_back_to_v0(start_node: StartNode) -> None:
    """A Git-Protocol header git must not get is ignored (protocol v0, as
    from a server that does not know it), and costs no git slot."""
    node = start_node(GITLAWB_GIT_MAX_READS="2")
    repo = create_repo(node, Agent(), "protocol")

    answers = [
        request(
            "GET",
            repo.url + "/info/refs?service=git-upload-pack",
            headers={"Git-Protocol": value},
        )
        for value in ["version=3", "version=2;rm -rf", "x" * 300, "version=3", "a=b"]
    ]

    assert [a.status for a in answers] == [200] * 5
    for answer in answers:
        lines = pkt_lines(answer.body)
        assert lines[:2] == [b"# service=git-upload-pack\n", Special.FLUSH]
        assert lines[2] != b"version 2\n"


def test_gzip_upload_pack_request(start_node: StartNode, tmp_path: Path) -> None:
    """An upload-pack request with Content-Encoding: gzip is decoded and
    answered with a valid pack."""
    node = start_node()
    agent = Agent()
    repo = create_repo(node, agent, "gzip")
    work = work_repo(tmp_path / "work")
    tip = add_commits(work, 4, "g")
    with SigningProxy(node.url, agent.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", cwd=work)
    body = (
        encode(f"want {tip} ofs-delta agent=test/1\n".encode())
        + FLUSH
        + encode(b"done\n")
    )

    answer = request(
        "POST",
        repo.url + "/git-upload-pack",
        gzip.compress(body),
        {
            "Content-Type": "application/x-git-upload-pack-request",
            "Content-Encoding": "gzip",
        },
    )

    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/x-git-upload-pack-result"
    assert answer.body.startswith(b"0008NAK\n")
    pack = tmp_path / "answer.pack"
    pack.write_bytes(answer.body[8:])
    git("index-pack", str(pack), cwd=tmp_path)
    listed = git("verify-pack", "-v", str(pack.with_suffix(".idx")), cwd=tmp_path)
    assert f"{tip} commit" in listed.stdout
    # 4 commits, their 4 trees and 4 blobs.
    assert sum(1 for line in listed.stdout.splitlines() if " commit " in line) == 4


def test_chunked_push(start_node: StartNode, tmp_path: Path) -> None:
    """A push larger than http.postBuffer travels chunked and is accepted."""
    node = start_node()
    agent = Agent()
    repo = create_repo(node, agent, "chunked")
    work = work_repo(tmp_path / "work")
    (work / "random.bin").write_bytes(os.urandom(200_000))
    git("add", "random.bin", cwd=work)
    git("commit", "-q", "-m", "random", cwd=work)
    tip = git("rev-parse", "HEAD", cwd=work).stdout.strip()

    with SigningProxy(node.url, agent.key) as proxy:
        git(
            "-c",
            "http.postBuffer=1024",
            "push",
            "-q",
            repo.via(proxy),
            "main",
            cwd=work,
        )
        posts = [r for r in proxy.requests if r[1].endswith("/git-receive-pack")]

    assert any(chunked and size > 200_000 for _, _, size, chunked in posts), posts
    assert repo.refs() == {"refs/heads/main": tip}
    git("fsck", "--no-progress", cwd=repo.path)
    events = query(node, "SELECT ref_name, old_sha, new_sha FROM push_events")
    assert events == [("refs/heads/main", ZERO, tip)]


# -- pushes and what they record ---------------------------------------------


def two_branches(
    node: NodeProcess, tmp_path: Path
) -> tuple[Repo, Path, dict[str, str]]:
    """
    A repository holding C{main} and C{other} (pushed and recorded), and a
    clone where C{main} gained a commit (fast-forward) and C{other} was
    rewritten (not a fast-forward); return them and the pushed tips.
    """
    agent = Agent()
    repo = create_repo(node, agent, "branches")
    work = work_repo(tmp_path / "work")
    add_commits(work, 2, "main")
    git("branch", "other", "main~1", cwd=work)
    add_commits(work, 1, "other", branch="other")
    before = {
        "refs/heads/main": git("rev-parse", "main", cwd=work).stdout.strip(),
        "refs/heads/other": git("rev-parse", "other", cwd=work).stdout.strip(),
    }
    with SigningProxy(node.url, agent.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", "other", cwd=work)
    add_commits(work, 1, "main-2")
    git("branch", "-f", "other", "main~2", cwd=work)
    add_commits(work, 1, "rewritten", branch="other")
    return repo, work, before


def pushes_recorded(node: NodeProcess) -> list[tuple[str, str, str]]:
    """
    The push events after the first push of L{two_branches}, oldest first.
    """
    return [
        (ref, old, new)
        for ref, old, new in query(
            node,
            "SELECT ref_name, old_sha, new_sha FROM push_events"
            " WHERE old_sha <> %s ORDER BY id",
            (ZERO,),
        )
    ]


def certificates(node: NodeProcess) -> dict[str, str]:
    return dict(query(node, "SELECT ref_name, new_sha FROM ref_certificates"))


def test_push_with_a_ref_git_rejects(start_node: StartNode, tmp_path: Path) -> None:
    """When git accepts one ref and rejects another (a forced non-fast-forward
    under receive.denyNonFastForwards), only the accepted ref is recorded."""
    node = start_node()
    repo, work, before = two_branches(node, tmp_path)
    git("config", "receive.denyNonFastForwards", "true", cwd=repo.path)
    main = git("rev-parse", "main", cwd=work).stdout.strip()

    with SigningProxy(node.url, repo.owner.key) as proxy:
        result = git(
            "push", "--force", "--porcelain", repo.via(proxy), "main", "other",
            cwd=work, check=False,
        )  # fmt: skip

    assert result.returncode == 1
    assert "!\trefs/heads/other:refs/heads/other\t[remote rejected]" in result.stdout
    assert repo.refs() == {**before, "refs/heads/main": main}
    assert pushes_recorded(node) == [
        ("refs/heads/main", before["refs/heads/main"], main)
    ]
    assert certificates(node) == {**before, "refs/heads/main": main}


def test_push_non_fast_forward_without_force(
    start_node: StartNode, tmp_path: Path
) -> None:
    """A push of one fast-forward and one non-fast-forward ref without force:
    git refuses the second, and only the first is updated and recorded."""
    node = start_node()
    repo, work, before = two_branches(node, tmp_path)
    main = git("rev-parse", "main", cwd=work).stdout.strip()

    with SigningProxy(node.url, repo.owner.key) as proxy:
        result = git("push", repo.via(proxy), "main", "other", cwd=work, check=False)

    assert result.returncode == 1
    assert "! [rejected]        other -> other (non-fast-forward)" in result.stderr
    assert repo.refs() == {**before, "refs/heads/main": main}
    assert pushes_recorded(node) == [
        ("refs/heads/main", before["refs/heads/main"], main)
    ]
    assert certificates(node) == {**before, "refs/heads/main": main}


def test_atomic_push_with_a_rejected_ref(start_node: StartNode, tmp_path: Path) -> None:
    """An --atomic push where git rejects one ref updates nothing and records
    nothing (its intent is abandoned)."""
    node = start_node()
    repo, work, before = two_branches(node, tmp_path)
    git("config", "receive.denyNonFastForwards", "true", cwd=repo.path)

    with SigningProxy(node.url, repo.owner.key) as proxy:
        result = git(
            "push", "--atomic", "--force", repo.via(proxy), "main", "other",
            cwd=work, check=False,
        )  # fmt: skip

    assert result.returncode == 1
    assert "atomic" in result.stderr
    assert repo.refs() == before
    assert pushes_recorded(node) == []
    assert certificates(node) == before
    states = query(node, "SELECT state FROM push_intents ORDER BY created_at")
    assert states == [("recorded",), ("abandoned",)]


def test_racing_pushes_to_one_ref(start_node: StartNode, tmp_path: Path) -> None:
    """Two clones push different commits to one ref at once: exactly one
    wins, the other gets git's rejection, and only the winner is recorded."""
    node = start_node()
    agent = Agent()
    repo = create_repo(node, agent, "race")
    seed = work_repo(tmp_path / "seed")
    base = add_commits(seed, 1, "base")
    with SigningProxy(node.url, agent.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", cwd=seed)
        clones = []
        for name in ("a", "b"):
            clone = tmp_path / name
            git("clone", "-q", repo.url, str(clone))
            clones.append((clone, add_commits(clone, 1, name)))
        # Both pushes are inside receive-pack together: the hook holds each
        # for a second before git locks the ref.
        hook = repo.path / "hooks" / "pre-receive"
        hook.parent.mkdir(exist_ok=True)
        hook.write_text("#!/bin/sh\ncat >/dev/null\nsleep 1\n")
        hook.chmod(0o755)
        running = [
            git_popen("push", "--porcelain", repo.via(proxy), "main", cwd=clone)
            for clone, _ in clones
        ]
        outcomes = [(p.wait(60), *p.communicate()) for p in running]

    codes = sorted(code for code, _, _ in outcomes)
    assert codes == [0, 1], outcomes
    winner = next(
        tip
        for (_, tip), (code, _, _) in zip(clones, outcomes, strict=True)
        if code == 0
    )
    loser_out = next(out for code, out, _ in outcomes if code == 1).decode()
    assert "[remote rejected]" in loser_out
    assert repo.refs() == {"refs/heads/main": winner}
    assert pushes_recorded(node) == [("refs/heads/main", base, winner)]
    assert certificates(node) == {"refs/heads/main": winner}
    states = sorted(s for (s,) in query(node, "SELECT state FROM push_intents"))
    assert states == ["abandoned", "recorded", "recorded"]


def test_certificates_listed_and_verified(
    start_node: StartNode, tmp_path: Path
) -> None:
    """After a push, GET .../certs lists one certificate per ref, each signed
    by the node over the protocol's fields."""
    node = start_node()
    agent = Agent()
    repo = create_repo(node, agent, "certs")
    work = work_repo(tmp_path / "work")
    add_commits(work, 2, "m")
    git("branch", "feature", "main~1", cwd=work)
    git("tag", "v1", "main", cwd=work)
    with SigningProxy(node.url, agent.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", "feature", "v1", cwd=work)
    node_did = request("GET", node.url + "/").json()["did"]

    answer = request("GET", f"{node.url}/api/v1/repos/{repo.short}/{repo.name}/certs")

    assert answer.status == 200
    listed = answer.json()
    assert listed["count"] == 3
    by_ref = {c["ref_name"]: c for c in listed["certificates"]}
    assert by_ref.keys() == {"refs/heads/main", "refs/heads/feature", "refs/tags/v1"}
    for ref, cert in by_ref.items():
        assert cert["new_sha"] == repo.refs()[ref]
        assert cert["old_sha"] == ZERO
        assert cert["pusher_did"] == agent.did
        assert cert["node_did"] == node_did
        assert cert["repo_id"] == repo.id
        assert verify_certificate(
            cert["signature"],
            new=cert["new_sha"],
            node=node_did,
            old=cert["old_sha"],
            pusher=cert["pusher_did"],
            ref=ref,
            repo_id=cert["repo_id"],
            ts=cert["issued_at"],
        )
        one = request(
            "GET",
            f"{node.url}/api/v1/repos/{repo.short}/{repo.name}/certs/{cert['id']}",
        )
        assert one.json() == cert


# -- who may read and push ---------------------------------------------------


def test_unsigned_push_is_refused(start_node: StartNode, tmp_path: Path) -> None:
    """An unsigned push is refused at info/refs with 401 not_an_agent and
    X-Gitlawb-Error: human_detected, and git gives up."""
    node = start_node()
    agent = Agent()
    repo = create_repo(node, agent, "unsigned")
    work = work_repo(tmp_path / "work")
    add_commits(work, 1, "u")

    answer = request("GET", repo.url + "/info/refs?service=git-receive-pack")
    with SigningProxy(node.url, None) as proxy:
        pushed = git("push", repo.via(proxy), "main", cwd=work, check=False)

    assert answer.status == 401
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["X-Gitlawb-Error"] == "human_detected"
    assert answer.json()["error"] == "not_an_agent"
    assert pushed.returncode != 0
    assert repo.refs() == {}
    assert query(node, "SELECT count(*) FROM push_intents") == [(0,)]


def test_non_owner_push_is_forbidden(start_node: StartNode, tmp_path: Path) -> None:
    """Under GITLAWB_ENFORCE_OWNER_PUSH another agent's signed push gets 403
    forbidden; the owner's goes through."""
    node = start_node(GITLAWB_ENFORCE_OWNER_PUSH="true")
    owner, stranger = Agent(), Agent()
    repo = create_repo(node, owner, "owned")
    work = work_repo(tmp_path / "work")
    tip = add_commits(work, 1, "o")
    target = repo.route + "/info/refs?service=git-receive-pack"

    answer = request(
        "GET", node.url + target, headers=stranger.signed_headers("GET", target, b"")
    )
    with SigningProxy(node.url, stranger.key) as proxy:
        refused = git("push", repo.via(proxy), "main", cwd=work, check=False)
    with SigningProxy(node.url, owner.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", cwd=work)

    assert answer.status == 403
    assert answer.json()["error"] == "forbidden"
    assert refused.returncode != 0
    assert "403" in refused.stderr
    assert repo.refs() == {"refs/heads/main": tip}
    assert query(node, "SELECT pusher_did FROM push_events") == [(owner.did,)]


def test_private_repository(start_node: StartNode, tmp_path: Path) -> None:
    """A private repository answers 404 to an anonymous clone and serves its
    owner through signed requests."""
    node = start_node()
    owner = Agent()
    repo = create_repo(node, owner, "secret", public=False)
    work = work_repo(tmp_path / "work")
    tip = add_commits(work, 2, "s")
    with SigningProxy(node.url, owner.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", cwd=work)
        git("clone", "-q", repo.via(proxy), str(tmp_path / "mine"))

    anonymous = git("clone", repo.url, str(tmp_path / "anon"), check=False)
    answer = request("GET", repo.url + "/info/refs?service=git-upload-pack")
    with SigningProxy(node.url, Agent().key) as proxy:
        stranger = git(
            "clone", repo.via(proxy), str(tmp_path / "stranger"), check=False
        )

    assert git("rev-parse", "HEAD", cwd=tmp_path / "mine").stdout.strip() == tip
    assert anonymous.returncode != 0
    assert "not found" in anonymous.stderr
    assert answer.status == 404
    assert answer.json()["error"] == "repo_not_found"
    assert stranger.returncode != 0
    # Private repositories are never announced to peers.
    assert query(node, "SELECT count(*) FROM outbox WHERE kind = 'ref_update'") == [
        (0,)
    ]


def test_pack_over_the_limit(start_node: StartNode, tmp_path: Path) -> None:
    """A push whose pack is over GITLAWB_MAX_PACK_BYTES gets 413 and leaves
    the repository as it was."""
    node = start_node(GITLAWB_MAX_PACK_BYTES="200000")
    agent = Agent()
    repo = create_repo(node, agent, "limit")
    work = work_repo(tmp_path / "work")
    tip = add_commits(work, 1, "small")
    with SigningProxy(node.url, agent.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", cwd=work)
    objects_before = sorted(p.name for p in (repo.path / "objects").rglob("*"))
    (work / "big.bin").write_bytes(os.urandom(600_000))
    git("add", "big.bin", cwd=work)
    git("commit", "-q", "-m", "big", cwd=work)

    with SigningProxy(node.url, agent.key) as proxy:
        refused = git("push", repo.via(proxy), "main", cwd=work, check=False)

    assert refused.returncode != 0
    assert "413" in refused.stderr, refused.stderr
    assert repo.refs() == {"refs/heads/main": tip}
    assert sorted(p.name for p in (repo.path / "objects").rglob("*")) == objects_before
    assert query(node, "SELECT count(*) FROM push_events") == [(1,)]


# -- slow: big ref sets, stalls, crashes -------------------------------------


def test_thousands_of_tags_and_a_huge_tag(
    start_node: StartNode, tmp_path: Path
) -> None:
    """5,000 annotated tags and one 300 KB annotated tag push and clone back
    unchanged."""
    node = start_node()
    agent = Agent()
    repo = create_repo(node, agent, "tags")
    work = work_repo(tmp_path / "work")
    add_commits(work, 3, "t")
    stream = []
    for i in range(5000):
        message = f"tag {i}\n".encode()
        stream.append(
            b"tag v%d\nfrom refs/heads/main~%d\ntagger Test <t@e> 1700000000 +0000\n"
            b"data %d\n%s\n" % (i, i % 3, len(message), message)
        )
    huge = b"".join(b"line %06d of a very long tag message\n" % i for i in range(8000))
    assert len(huge) > 300_000
    stream.append(
        b"tag huge\nfrom refs/heads/main\ntagger Test <t@e> 1700000000 +0000\n"
        b"data %d\n%s\n" % (len(huge), huge)
    )
    git("fast-import", "--quiet", cwd=work, input=b"".join(stream))
    listing = "--format=%(refname) %(objectname) %(objecttype) %(*objectname)"

    with SigningProxy(node.url, agent.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", "refs/tags/*", cwd=work)
    git("clone", "-q", "--mirror", repo.url, str(tmp_path / "mirror.git"))

    here = git("for-each-ref", listing, cwd=work).stdout
    there = git("for-each-ref", listing, cwd=tmp_path / "mirror.git").stdout
    assert here.count("\n") == 5002
    assert there == here
    tag = git("cat-file", "tag", "huge", cwd=tmp_path / "mirror.git").stdout
    assert tag.endswith(huge.decode())
    assert query(node, "SELECT count(*) FROM ref_certificates") == [(5002,)]


def test_clients_hanging_up_mid_clone(start_node: StartNode, tmp_path: Path) -> None:
    """Clients that hang up in the middle of a clone give their git slot back
    (the next clone is served) and do not hold up the node's stop."""
    node = start_node(GITLAWB_GIT_MAX_READS="1")
    agent = Agent()
    repo = create_repo(node, agent, "hangup")
    work = work_repo(tmp_path / "work")
    (work / "noise.bin").write_bytes(os.urandom(8_000_000))
    git("add", "noise.bin", cwd=work)
    git("commit", "-q", "-m", "noise", cwd=work)
    tip = git("rev-parse", "HEAD", cwd=work).stdout.strip()
    git("push", "-q", str(repo.path), "main", cwd=work)  # straight to disk
    body = encode(f"want {tip} ofs-delta\n".encode()) + FLUSH + encode(b"done\n")

    for _ in range(3):
        with socket.socket() as client:
            client.connect(("127.0.0.1", node.port))
            client.sendall(
                f"POST {repo.route}/git-upload-pack HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            assert client.recv(100).startswith(b"HTTP/1.1 200 ")
        wait_for(lambda: not git_children(repo.path), what="git to be stopped")
    clone = git("clone", "-q", repo.url, str(tmp_path / "clone"), check=False)
    started = time.monotonic()
    status = node.stop()

    assert clone.returncode == 0, clone.stderr
    assert time.monotonic() - started < 10
    assert status in (0, -signal.SIGTERM)
    assert "nothing was cut off" in node.log()


def test_stalled_git_is_killed(start_node: StartNode, tmp_path: Path) -> None:
    """A push whose pre-receive hook hangs is stopped after
    GITLAWB_GIT_SERVICE_TIMEOUT_SECS: the client gets 504 git_timeout, the
    hook's process group is gone, and nothing is recorded."""
    node = start_node(GITLAWB_GIT_SERVICE_TIMEOUT_SECS="2")
    agent = Agent()
    repo = create_repo(node, agent, "stall")
    marker = new_marker()
    stalling_hook(repo, marker)
    work = work_repo(tmp_path / "work")
    add_commits(work, 1, "s")

    started = time.monotonic()
    with SigningProxy(node.url, agent.key) as proxy:
        pushing = git_popen("push", repo.via(proxy), "main", cwd=work)
        wait_for(lambda: pids_with(marker), what="the hook to start")
        code = pushing.wait(60)
        stderr = pushing.communicate()[1].decode()
    elapsed = time.monotonic() - started

    assert code != 0
    assert "504" in stderr, stderr
    assert elapsed < 30
    wait_for(lambda: not pids_with(marker), timeout=10, what="the hook to die")
    assert "git timed out" in node.log()
    assert repo.refs() == {}
    assert query(node, "SELECT state FROM push_intents") == [("abandoned",)]
    # The repository is usable: the next push goes through.
    (repo.path / "hooks" / "pre-receive").unlink()
    with SigningProxy(node.url, agent.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", cwd=work)
    git("fsck", "--no-progress", cwd=repo.path)


def test_client_that_stops_reading_is_cut_off(
    start_node: StartNode, tmp_path: Path
) -> None:
    """A client that stops reading a large clone response leaves git blocked
    on a full pipe; the service timeout kills git and cuts the connection,
    so the client never takes the truncated pack for a whole one."""
    node = start_node(GITLAWB_GIT_SERVICE_TIMEOUT_SECS="2")
    agent = Agent()
    repo = create_repo(node, agent, "backpressure")
    work = work_repo(tmp_path / "work")
    (work / "noise.bin").write_bytes(os.urandom(12_000_000))
    git("add", "noise.bin", cwd=work)
    git("commit", "-q", "-m", "noise", cwd=work)
    tip = git("rev-parse", "HEAD", cwd=work).stdout.strip()
    git("push", "-q", str(repo.path), "main", cwd=work)  # straight to disk
    body = encode(f"want {tip} ofs-delta\n".encode()) + FLUSH + encode(b"done\n")

    with socket.socket() as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", node.port))
        client.sendall(
            f"POST {repo.route}/git-upload-pack HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            "Content-Type: application/x-git-upload-pack-request\r\n\r\n".encode()
            + body
        )
        wait_for(lambda: git_children(repo.path), what="upload-pack to start")
        time.sleep(1)
        assert git_children(repo.path), "git finished: the response was not held"
        wait_for(lambda: not git_children(repo.path), what="git to be killed")
        received = bytearray()
        client.settimeout(10)
        try:
            while chunk := client.recv(1 << 20):
                received += chunk
        except ConnectionResetError:
            pass

    assert received.startswith(b"HTTP/1.1 200 ")
    assert not received.endswith(b"\r\n0\r\n\r\n")
    assert len(received) < 12_000_000
    assert "git timed out" in node.log()


def test_node_killed_during_a_push(start_node: StartNode, tmp_path: Path) -> None:
    """SIGKILL while git runs a push: after a restart on the same data and
    database the repository is sound, the interrupted intent is closed, and
    the next push works."""
    node = start_node()
    agent = Agent()
    repo = create_repo(node, agent, "killed")
    marker = new_marker()
    flag = tmp_path / "stall-flag"
    flag.touch()
    stalling_hook(repo, marker, flag)
    work = work_repo(tmp_path / "work")
    tip = add_commits(work, 3, "k", size=5000)

    with SigningProxy(node.url, agent.key) as proxy:
        pushing = git_popen("push", repo.via(proxy), "main", cwd=work)
        hook_pids = wait_for(lambda: pids_with(marker), what="the hook to start")
        node.kill()
        assert pushing.wait(60) != 0
        pushing.communicate()
    # The orphaned receive-pack and its hook outlive the node; they are ours.
    for pid in hook_pids:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not pids_with(marker), what="the orphans to die")
    assert query(node, "SELECT state FROM push_intents") == [("running",)]
    # git died with the pushed objects still in quarantine.
    assert list((repo.path / "objects").glob("tmp_objdir-incoming-*"))
    flag.unlink()

    node.start()

    wait_for(
        lambda: query(node, "SELECT state FROM push_intents") == [("abandoned",)],
        what="the interrupted push to be reconciled",
    )
    git("fsck", "--no-progress", cwd=repo.path)
    assert not list((repo.path / "objects").glob("*incoming-*"))
    assert repo.refs() == {}
    with SigningProxy(node.url, agent.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", cwd=work)
    assert repo.refs() == {"refs/heads/main": tip}
    assert query(node, "SELECT ref_name, new_sha FROM push_events") == [
        ("refs/heads/main", tip)
    ]


def test_restart_while_an_orphaned_push_still_runs(
    start_node: StartNode, tmp_path: Path
) -> None:
    """A push whose git outlived a SIGKILLed node (its hook still running)
    cannot move the ref behind the back of the restarted node: what is on
    disk and what is recorded agree once the orphan is gone."""
    node = start_node()
    agent = Agent()
    repo = create_repo(node, agent, "orphan")
    marker = new_marker()
    hook = repo.path / "hooks" / "pre-receive"
    hook.parent.mkdir(exist_ok=True)
    # Sleeps 4 s, then accepts the push.
    hook.write_text(f"#!/bin/sh\ncat >/dev/null\nsleep 4.{marker}\nexit 0\n")
    hook.chmod(0o755)
    work = work_repo(tmp_path / "work")
    tip = add_commits(work, 2, "o")

    with SigningProxy(node.url, agent.key) as proxy:
        pushing = git_popen("push", repo.via(proxy), "main", cwd=work)
        wait_for(lambda: pids_with(marker), what="the hook to start")
        node.kill()
        pushing.wait(60)
        pushing.communicate()
    node.start()
    wait_for(
        lambda: query(node, "SELECT state FROM push_intents") != [("running",)],
        what="the interrupted push to be reconciled",
    )
    # Whatever the orphan was left to do, it is done (or stopped) by now.
    wait_for(lambda: not pids_with(marker), timeout=15, what="the orphan to end")
    time.sleep(0.5)

    refs = repo.refs()
    events = query(node, "SELECT ref_name, new_sha FROM push_events")
    certs = query(node, "SELECT ref_name, new_sha FROM ref_certificates")
    assert refs in ({}, {"refs/heads/main": tip})
    assert dict(events) == refs
    assert dict(certs) == refs
    git("fsck", "--no-progress", cwd=repo.path)


def test_crash_after_git_before_database_is_reconciled_once(
    start_node: StartNode, tmp_path: Path
) -> None:
    """A push git finished but the node never recorded (an intent left
    'running' whose commands match the refs) is recorded exactly once, at the
    next start, and not again at the one after."""
    node = start_node()
    agent = Agent()
    repo = create_repo(node, agent, "crash")
    work = work_repo(tmp_path / "work")
    first = add_commits(work, 1, "a")
    with SigningProxy(node.url, agent.key) as proxy:
        git("push", "-q", repo.via(proxy), "main", cwd=work)
    node.stop()
    # What git did before the crash: the ref moved...
    second = add_commits(work, 1, "b")
    git("push", "-q", str(repo.path), "main", cwd=work)
    # ... and the intent written before git started is still open.
    intent = str(uuid.uuid4())
    with database(node) as cursor:
        cursor.execute(
            "INSERT INTO push_intents (id, repo_id, pusher_did, commands)"
            " VALUES (%s, %s, %s, %s)",
            (
                intent,
                repo.id,
                agent.did,
                json.dumps([[first, second, "refs/heads/main"]]),
            ),
        )

    node.start()
    wait_for(
        lambda: (
            query(node, "SELECT state FROM push_intents WHERE id = %s", (intent,))
            == [("recorded",)]
        ),
        what="the intent to be reconciled",
    )
    node.stop()
    node.start()
    time.sleep(1)  # room for a second (wrong) reconciliation to show up

    events = query(
        node,
        "SELECT push_id::text, ref_name, old_sha, new_sha FROM push_events"
        " WHERE old_sha <> %s",
        (ZERO,),
    )
    assert events == [(intent, "refs/heads/main", first, second)]
    certs = query(node, "SELECT ref_name, old_sha, new_sha FROM ref_certificates")
    assert certs == [("refs/heads/main", first, second)]
    assert query(
        node, "SELECT push_count FROM agents WHERE did = %s", (agent.did,)
    ) == [(2,)]
    assert node.log().count("reconciled interrupted push intent") == 1

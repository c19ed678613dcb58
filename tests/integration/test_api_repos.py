"""
The repository routes (PROTOCOL.md section 5) and the API's common error
behaviour, on a real node process, database and git.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from tests.support import (
    Agent,
    NodeProcess,
    Response,
    node_without_rate_limits,
    request,
)

pytestmark = pytest.mark.integration

REPO_KEYS = {
    "id",
    "name",
    "owner_did",
    "description",
    "is_public",
    "default_branch",
    "clone_url",
    "star_count",
    "created_at",
    "updated_at",
    "forked_from",
}


@pytest.fixture(scope="module")
def node(
    pg_server: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeProcess]:
    """
    One node for the tests that need no settings of their own, rate limits
    off (each test uses fresh agents and names, so they do not see each other).
    """
    tmp = tmp_path_factory.mktemp("repos")
    with node_without_rate_limits(tmp) as process:
        yield process


def create(node: NodeProcess, agent: Agent, name: str, **body: Any) -> Response:
    value = {
        "default_branch": "main",
        "description": None,
        "is_public": True,
        "name": name,
        **body,
    }
    return agent.call(node, "POST", "/api/v1/repos", value)


def bare_path(node: NodeProcess, agent: Agent, name: str) -> Path:
    return node.data_dir / "repos" / agent.key.short / f"{name}.git"


def git(*args: str, cwd: Path | None = None) -> str:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd or "/tmp"),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Ada",
        "GIT_AUTHOR_EMAIL": "ada@example.com",
        "GIT_COMMITTER_NAME": "Ada",
        "GIT_COMMITTER_EMAIL": "ada@example.com",
        "GIT_AUTHOR_DATE": "2026-01-02T03:04:05+00:00",
        "GIT_COMMITTER_DATE": "2026-01-02T03:04:05+00:00",
    }
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, check=True
    )
    return done.stdout.decode().strip()


def populate(
    tmp_path: Path,
    bare: Path,
    commits: list[dict[str, bytes]],
    branch: str = "main",
) -> list[str]:
    """
    Push commits (each a set of files to write) straight into a bare
    repository on disk, and return their hashes, oldest first.
    """
    work = tmp_path / f"work-{bare.name}-{branch}"
    git("init", "-q", "-b", branch, str(work))
    hashes = []
    for number, files in enumerate(commits):
        for name, content in files.items():
            target = work / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", f"commit {number}\n\nbody", cwd=work)
        hashes.append(git("rev-parse", "HEAD", cwd=work))
    git("push", "-q", str(bare), f"HEAD:refs/heads/{branch}", cwd=work)
    return hashes


def sql(node: NodeProcess, statement: str, params: Any = None) -> list[Any]:
    connection = psycopg2.connect(node.env["DATABASE_URL"])
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def get(node: NodeProcess, target: str, agent: Agent | None = None) -> Response:
    if agent is not None:
        return agent.call(node, "GET", target)
    return request("GET", node.url + target)


# -- Create ----------------------------------------------------------------------------


def test_create_answers_201_with_the_repo_and_makes_a_bare_repository(
    node: NodeProcess,
) -> None:
    """Creating answers 201 with a Repo object and a bare repo whose HEAD is set."""
    agent = Agent()

    answer = create(node, agent, "demo", description="first", default_branch="trunk")

    assert answer.status == 201
    repo = answer.json()
    assert set(repo) == REPO_KEYS
    assert repo["name"] == "demo"
    assert repo["owner_did"] == agent.did
    assert repo["description"] == "first"
    assert repo["is_public"] is True
    assert repo["default_branch"] == "trunk"
    assert repo["clone_url"] == f"{node.url}/{agent.key.short}/demo.git"
    assert repo["star_count"] == 0
    assert repo["forked_from"] is None
    assert repo["created_at"].endswith("+00:00")
    head = (bare_path(node, agent, "demo") / "HEAD").read_text()
    assert head == "ref: refs/heads/trunk\n"


def test_create_the_protocol_test_vector_body(node: NodeProcess) -> None:
    """The exact body gl sends creates the repository."""
    agent = Agent()
    body = (
        b'{"default_branch":"main","description":null,"is_public":true,"name":"demo"}'
    )

    answer = agent.call(node, "POST", "/api/v1/repos", raw=body)

    assert answer.status == 201
    assert answer.json()["description"] is None


def test_create_drops_one_git_suffix(node: NodeProcess) -> None:
    """A name given with .git is stored without it."""
    agent = Agent()

    answer = create(node, agent, "tool.git")

    assert answer.json()["name"] == "tool"


def test_create_twice_is_repo_exists(node: NodeProcess) -> None:
    """A second create of the same name is 409 repo_exists."""
    agent = Agent()
    create(node, agent, "twice")

    again = create(node, agent, "twice", description="other")

    assert again.status == 409
    assert again.json()["error"] == "repo_exists"


def test_same_name_for_two_owners(node: NodeProcess) -> None:
    """Names are per owner: two agents may both have one called 'app'."""
    first, second = Agent(), Agent()

    answers = [create(node, first, "app"), create(node, second, "app")]

    assert [a.status for a in answers] == [201, 201]


def test_concurrent_creates_of_one_name_give_one_repo(node: NodeProcess) -> None:
    """Of eight simultaneous creates of one name, one wins and the rest get 409."""
    agent = Agent()
    statuses: list[int] = []

    def attempt(number: int) -> None:
        statuses.append(create(node, agent, "race", description=str(number)).status)

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(statuses) == [201] + [409] * 7
    assert bare_path(node, agent, "race").is_dir()


@pytest.mark.parametrize(
    "name",
    [
        "",
        "bad name",
        ".hidden",
        "trailing.",
        "a..b",
        "x.git.git",
        "slash/name",
        "é",
        "a" * 101,
    ],
)
def test_create_with_an_invalid_name_is_bad_request(
    node: NodeProcess, name: str
) -> None:
    """Names outside the allowed characters and shapes are 400 bad_request."""
    agent = Agent()

    answer = create(node, agent, name)

    assert answer.status == 400
    assert answer.json()["error"] == "bad_request"


@pytest.mark.parametrize("name", ["a", "A-b_c.d", "v1.2.3", "_x", "-x-"])
def test_create_with_valid_names(node: NodeProcess, name: str) -> None:
    """Letters, digits, '-', '_' and inner dots make valid names."""
    agent = Agent()

    answer = create(node, agent, name)

    assert answer.status == 201
    assert answer.json()["name"] == name


@pytest.mark.parametrize(
    ("body", "word"),
    [
        ({"name": 5}, "name"),
        ({"name": None}, "name"),
        ({"is_public": "yes"}, "is_public"),
        ({"is_public": 1}, "is_public"),
        ({"description": ["x"]}, "description"),
        ({"description": "x" * 2001}, "description"),
        ({"default_branch": 3}, "default_branch"),
        ({"default_branch": "a..b"}, "default_branch"),
        ({"default_branch": "-x"}, "default_branch"),
        ({"description": "nul\u0000inside"}, "description"),
    ],
)
def test_create_with_wrong_types_says_which_member(
    node: NodeProcess, body: dict[str, Any], word: str
) -> None:
    """A member of the wrong type or shape is 400 bad_request naming the member."""
    agent = Agent()
    value = {"name": "typed", **body}

    answer = agent.call(node, "POST", "/api/v1/repos", value)

    assert answer.status == 400
    assert answer.json()["error"] == "bad_request"
    assert word in answer.json()["message"]


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"\xff\xfe", b'"name"', b"null"])
def test_create_with_a_body_that_is_no_json_object_is_bad_request(
    node: NodeProcess, raw: bytes
) -> None:
    """A body that is not a JSON object is a JSON 400."""
    agent = Agent()

    answer = agent.call(node, "POST", "/api/v1/repos", raw=raw)

    assert answer.status == 400
    assert answer.json()["error"] == "bad_request"


def test_create_without_a_signature_is_not_an_agent(node: NodeProcess) -> None:
    """An unsigned create is 401 not_an_agent with the hint and its headers."""
    body = json.dumps({"name": "nobody"}).encode()

    answer = request(
        "POST", node.url + "/api/v1/repos", body, {"Content-Type": "application/json"}
    )

    assert answer.status == 401
    assert answer.json()["error"] == "not_an_agent"
    assert answer.json()["hint"] == "gl identity new && gl register"
    assert answer.headers["X-Gitlawb-Error"] == "human_detected"
    assert "Signature" in answer.headers["WWW-Authenticate"]


def test_create_replayed_is_refused(node: NodeProcess) -> None:
    """The same signed create sent again is 401 replayed_signature, not 409."""
    agent = Agent()
    body = json.dumps({"name": "once"}).encode()
    headers = agent.signed_headers("POST", "/api/v1/repos", body)
    headers["Content-Type"] = "application/json"

    first = request("POST", node.url + "/api/v1/repos", body, headers)
    second = request("POST", node.url + "/api/v1/repos", body, headers)

    assert first.status == 201
    assert second.status == 401
    assert second.json()["error"] == "replayed_signature"


def test_signed_get_may_be_repeated(node: NodeProcess) -> None:
    """The same signed GET sent twice is answered twice."""
    agent = Agent()
    create(node, agent, "again")
    target = f"/api/v1/repos/{agent.key.short}/again"
    headers = agent.signed_headers("GET", target, b"")

    first = request("GET", node.url + target, None, headers)
    second = request("GET", node.url + target, None, headers)

    assert first.status == second.status == 200


def test_oversized_body_is_payload_too_large(node: NodeProcess) -> None:
    """A JSON body announced over the limit is refused with a JSON 413 up front."""
    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
    try:
        # Only the headers go out: the node answers before reading any body.
        connection.putrequest("POST", "/api/v1/repos")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(3 * 1024 * 1024))
        connection.endheaders()
        answer = connection.getresponse()
        status, body = answer.status, answer.read()
    finally:
        connection.close()

    assert status == 413
    assert json.loads(body)["error"] == "payload_too_large"


def test_orphaned_directory_is_replaced_by_a_create(
    node: NodeProcess, tmp_path: Path
) -> None:
    """A repository left on disk without a row (a crash before commit) is replaced."""
    agent = Agent()
    orphan = bare_path(node, agent, "orphan")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    git("init", "-q", "--bare", "-b", "old", str(orphan))
    populate(tmp_path, orphan, [{"stale.txt": b"old"}], branch="old")

    answer = create(node, agent, "orphan")

    assert answer.status == 201
    assert (orphan / "HEAD").read_text() == "ref: refs/heads/main\n"
    refs = get(node, f"/api/v1/repos/{agent.key.short}/orphan/refs").json()
    assert refs == {"refs": [], "count": 0}


def test_failed_disk_create_leaves_no_row(node: NodeProcess) -> None:
    """When the repository cannot be made on disk, no row remains either."""
    agent = Agent()
    blocker = node.data_dir / "repos" / agent.key.short
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory")

    try:
        answer = create(node, agent, "blocked")
        listed = get(node, f"/api/v1/repos?owner={agent.key.short}")
    finally:
        blocker.unlink()

    assert answer.status == 500
    assert answer.json()["error"] == "git_error"
    assert listed.json() == []
    assert listed.headers["X-Total-Count"] == "0"
    assert create(node, agent, "blocked", description="retry").status == 201


# -- Read one --------------------------------------------------------------------------


def test_repo_by_full_did_short_key_and_git_suffix(node: NodeProcess) -> None:
    """One repository is found by full DID, short key, and with .git."""
    agent = Agent()
    created = create(node, agent, "found").json()

    answers = [
        get(node, f"/api/v1/repos/{agent.did}/found"),
        get(node, f"/api/v1/repos/{agent.key.short}/found"),
        get(node, f"/api/v1/repos/{agent.key.short}/found.git"),
    ]

    assert [a.status for a in answers] == [200, 200, 200]
    assert all(a.json() == created for a in answers)


@pytest.mark.parametrize(
    "target",
    [
        "/api/v1/repos/{short}/missing",
        "/api/v1/repos/notadid/found",
        "/api/v1/repos/{short}/..",
        "/api/v1/repos/{short}/found.git.git",
    ],
)
def test_missing_repo_is_repo_not_found(node: NodeProcess, target: str) -> None:
    """A repository that does not exist, or cannot, is 404 repo_not_found."""
    agent = Agent()
    create(node, agent, "found")

    answer = get(node, target.format(short=agent.key.short))

    assert answer.status == 404
    assert answer.json()["error"] == "repo_not_found"


# -- Private repositories --------------------------------------------------------------


PRIVATE_ROUTES = [
    "/api/v1/repos/{o}/{r}",
    "/api/v1/repos/{o}/{r}/commits",
    "/api/v1/repos/{o}/{r}/refs",
    "/api/v1/repos/{o}/{r}/tree",
    "/api/v1/repos/{o}/{r}/tree/docs",
    "/api/v1/repos/{o}/{r}/blob/README.md",
    "/api/v1/repos/{o}/{r}/replicas",
]


@pytest.fixture(scope="module")
def private_repo(
    node: NodeProcess, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Agent, str]:
    owner = Agent()
    assert create(node, owner, "secret", is_public=False).status == 201
    populate(
        tmp_path_factory.mktemp("private"),
        bare_path(node, owner, "secret"),
        [{"README.md": b"hidden", "docs/a.txt": b"a"}],
    )
    return owner, "secret"


@pytest.mark.parametrize("route", PRIVATE_ROUTES)
def test_private_repo_is_not_found_anonymously(
    node: NodeProcess, private_repo: tuple[Agent, str], route: str
) -> None:
    """Every read route answers 404 repo_not_found to an anonymous caller."""
    owner, name = private_repo

    answer = get(node, route.format(o=owner.key.short, r=name))

    assert answer.status == 404
    assert answer.json()["error"] == "repo_not_found"


@pytest.mark.parametrize("route", PRIVATE_ROUTES)
def test_private_repo_is_not_found_for_another_signer(
    node: NodeProcess, private_repo: tuple[Agent, str], route: str
) -> None:
    """Every read route answers 404 repo_not_found to a signer who is not the owner."""
    owner, name = private_repo

    answer = get(node, route.format(o=owner.did, r=name), Agent())

    assert answer.status == 404
    assert answer.json()["error"] == "repo_not_found"


@pytest.mark.parametrize("route", PRIVATE_ROUTES)
def test_private_repo_is_visible_to_its_owner(
    node: NodeProcess, private_repo: tuple[Agent, str], route: str
) -> None:
    """Every read route answers the owner's signed request."""
    owner, name = private_repo

    answer = get(node, route.format(o=owner.key.short, r=name), owner)

    assert answer.status == 200


def test_private_repo_is_listed_for_its_owner_only(
    node: NodeProcess, private_repo: tuple[Agent, str]
) -> None:
    """Listings show a private repository to its owner and to nobody else."""
    owner, _ = private_repo
    target = f"/api/v1/repos?owner={owner.key.short}"

    anonymous = get(node, target)
    stranger = get(node, target, Agent())
    mine = get(node, target, owner)

    assert anonymous.json() == [] and anonymous.headers["X-Total-Count"] == "0"
    assert stranger.json() == []
    assert [r["name"] for r in mine.json()] == ["secret"]
    assert mine.headers["X-Total-Count"] == "1"


def test_private_repo_cannot_be_forked_by_another(
    node: NodeProcess, private_repo: tuple[Agent, str]
) -> None:
    """Forking someone else's private repository is 404 repo_not_found."""
    owner, name = private_repo

    answer = Agent().call(
        node, "POST", f"/api/v1/repos/{owner.key.short}/{name}/fork", {"name": None}
    )

    assert answer.status == 404
    assert answer.json()["error"] == "repo_not_found"


# -- List ------------------------------------------------------------------------------


def test_list_is_a_bare_array_with_a_total_count(node: NodeProcess) -> None:
    """The list is a JSON array of Repo objects, newest first, with X-Total-Count."""
    agent = Agent()
    for name in ("one", "two", "three"):
        create(node, agent, name)

    answer = get(node, f"/api/v1/repos?owner={agent.did}")

    assert answer.status == 200
    assert [r["name"] for r in answer.json()] == ["three", "two", "one"]
    assert all(set(r) == REPO_KEYS for r in answer.json())
    assert answer.headers["X-Total-Count"] == "3"


def test_list_pages_with_limit_and_offset(node: NodeProcess) -> None:
    """limit and offset page through the list; the total stays the whole count."""
    agent = Agent()
    for number in range(5):
        create(node, agent, f"p{number}")
    base = f"/api/v1/repos?owner={agent.key.short}"

    pages = [get(node, f"{base}&limit=2&offset={o}") for o in (0, 2, 4, 6)]

    assert [[r["name"] for r in p.json()] for p in pages] == [
        ["p4", "p3"],
        ["p2", "p1"],
        ["p0"],
        [],
    ]
    assert {p.headers["X-Total-Count"] for p in pages} == {"5"}


def test_list_of_everyone_holds_every_owner(node: NodeProcess) -> None:
    """Without owner the list holds public repositories of every owner."""
    first, second = Agent(), Agent()
    create(node, first, "mine")
    create(node, second, "theirs")

    answer = get(node, "/api/v1/repos")

    owners = {r["owner_did"] for r in answer.json()}
    assert {first.did, second.did} <= owners
    assert int(answer.headers["X-Total-Count"]) == len(answer.json())


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=201",
        "limit=abc",
        "limit=",
        "offset=-1",
        "offset=x",
        "owner=nope",
    ],
)
def test_list_with_bad_parameters_is_bad_request(node: NodeProcess, query: str) -> None:
    """limit outside 1..200, a negative offset or a bad owner is 400."""
    answer = get(node, f"/api/v1/repos?{query}")

    assert answer.status == 400
    assert answer.json()["error"] == "bad_request"


def test_list_limit_bounds_are_accepted(node: NodeProcess) -> None:
    """limit=1 and limit=200 are both accepted."""
    answers = [get(node, f"/api/v1/repos?limit={n}") for n in (1, 200)]

    assert [a.status for a in answers] == [200, 200]


# -- Fork ------------------------------------------------------------------------------


def test_fork_copies_the_repository_and_names_its_source(
    node: NodeProcess, tmp_path: Path
) -> None:
    """A fork is a 201 Repo with forked_from, owned by the forker, same commits."""
    owner, forker = Agent(), Agent()
    source = create(node, owner, "upstream", description="original").json()
    hashes = populate(tmp_path, bare_path(node, owner, "upstream"), [{"a": b"1"}])

    answer = forker.call(
        node, "POST", f"/api/v1/repos/{owner.did}/upstream/fork", {"name": None}
    )

    assert answer.status == 201
    fork = answer.json()
    assert set(fork) == REPO_KEYS
    assert fork["forked_from"] == source["id"]
    assert fork["owner_did"] == forker.did
    assert fork["name"] == "upstream"
    assert fork["description"] == "original"
    assert fork["clone_url"] == f"{node.url}/{forker.key.short}/upstream.git"
    commits = get(node, f"/api/v1/repos/{forker.key.short}/upstream/commits").json()
    assert [c["hash"] for c in commits["commits"]] == hashes


def test_fork_under_a_new_name(node: NodeProcess) -> None:
    """A fork may take a new name, even from the same owner."""
    owner = Agent()
    create(node, owner, "base")

    answer = owner.call(
        node, "POST", f"/api/v1/repos/{owner.key.short}/base/fork", {"name": "copy"}
    )

    assert answer.status == 201
    assert answer.json()["name"] == "copy"
    assert (bare_path(node, owner, "copy") / "HEAD").is_file()


def test_fork_onto_an_existing_name_is_repo_exists(node: NodeProcess) -> None:
    """Forking onto a name the forker already has is 409 repo_exists."""
    owner = Agent()
    create(node, owner, "same")

    answer = owner.call(node, "POST", f"/api/v1/repos/{owner.did}/same/fork", {})

    assert answer.status == 409
    assert answer.json()["error"] == "repo_exists"


def test_fork_of_a_missing_repo_is_repo_not_found(node: NodeProcess) -> None:
    """Forking a repository that does not exist is 404 repo_not_found."""
    agent = Agent()

    answer = agent.call(
        node, "POST", f"/api/v1/repos/{agent.key.short}/nothing/fork", {"name": None}
    )

    assert answer.status == 404
    assert answer.json()["error"] == "repo_not_found"


@pytest.mark.parametrize("body", [{"name": 3}, {"name": "bad name"}, {"name": ".x"}])
def test_fork_with_a_bad_name_is_bad_request(
    node: NodeProcess, body: dict[str, Any]
) -> None:
    """A fork name of the wrong type or shape is 400 bad_request."""
    owner = Agent()
    create(node, owner, "src")

    answer = owner.call(node, "POST", f"/api/v1/repos/{owner.did}/src/fork", body)

    assert answer.status == 400
    assert answer.json()["error"] == "bad_request"


def test_fork_unsigned_is_not_an_agent(node: NodeProcess) -> None:
    """An unsigned fork is 401 not_an_agent."""
    owner = Agent()
    create(node, owner, "src")

    answer = request(
        "POST",
        f"{node.url}/api/v1/repos/{owner.did}/src/fork",
        b'{"name":null}',
        {"Content-Type": "application/json"},
    )

    assert answer.status == 401
    assert answer.json()["error"] == "not_an_agent"


# -- Content ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def content_repo(
    node: NodeProcess, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, list[str]]:
    """
    A public repository with three commits on main and one on 'topic'.
    """
    owner = Agent()
    assert create(node, owner, "content").status == 201
    bare = bare_path(node, owner, "content")
    tmp = tmp_path_factory.mktemp("content")
    hashes = populate(
        tmp,
        bare,
        [
            {"README.md": b"# hello\n"},
            {"docs/guide.md": b"guide", "bin/data": bytes(range(256))},
            {"README.md": b"# hello again\n"},
        ],
    )
    topic = tmp / "topic"
    git("clone", "-q", str(bare), str(topic))
    git("checkout", "-q", "-b", "topic", cwd=topic)
    (topic / "topic.txt").write_text("t")
    git("add", "-A", cwd=topic)
    git("commit", "-q", "-m", "on topic", cwd=topic)
    git("push", "-q", "origin", "topic", cwd=topic)
    return f"/api/v1/repos/{owner.key.short}/content", hashes


def test_commits_newest_first(
    node: NodeProcess, content_repo: tuple[str, list[str]]
) -> None:
    """commits lists the default branch newest first: hash, author, date, message."""
    base, hashes = content_repo

    answer = get(node, f"{base}/commits")

    commits = answer.json()["commits"]
    assert [c["hash"] for c in commits] == hashes[::-1]
    assert commits[0] == {
        "hash": hashes[2],
        "author": "Ada",
        "date": "2026-01-02T03:04:05.000000+00:00",
        "message": "commit 2",
    }


def test_commits_honour_branch_and_limit(
    node: NodeProcess, content_repo: tuple[str, list[str]]
) -> None:
    """?branch= picks the branch and ?limit= the count (as gl sends them)."""
    base, _ = content_repo

    answer = get(node, f"{base}/commits?branch=topic&limit=2")

    assert [c["message"] for c in answer.json()["commits"]] == ["on topic", "commit 2"]


def test_commits_of_a_missing_branch_are_empty(
    node: NodeProcess, content_repo: tuple[str, list[str]]
) -> None:
    """A branch that does not exist has no commits."""
    base, _ = content_repo

    answer = get(node, f"{base}/commits?branch=nope")

    assert answer.status == 200
    assert answer.json() == {"commits": []}


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=1001", "limit=z", "branch=a..b", "branch=-x"]
)
def test_commits_with_bad_parameters_are_bad_request(
    node: NodeProcess, content_repo: tuple[str, list[str]], query: str
) -> None:
    """A bad limit or branch is 400 bad_request."""
    base, _ = content_repo

    answer = get(node, f"{base}/commits?{query}")

    assert answer.status == 400
    assert answer.json()["error"] == "bad_request"


def test_commits_of_an_empty_repo(node: NodeProcess) -> None:
    """A repository without commits lists none."""
    agent = Agent()
    create(node, agent, "empty")

    answer = get(node, f"/api/v1/repos/{agent.key.short}/empty/commits")

    assert answer.json() == {"commits": []}


def test_refs(node: NodeProcess, content_repo: tuple[str, list[str]]) -> None:
    """refs lists every ref with its object id, and the count."""
    base, hashes = content_repo

    answer = get(node, f"{base}/refs")

    body = answer.json()
    assert body["count"] == 2
    names = {r["name"]: r["sha"] for r in body["refs"]}
    assert names["refs/heads/main"] == hashes[2]
    assert set(names) == {"refs/heads/main", "refs/heads/topic"}


def test_tree_root(node: NodeProcess, content_repo: tuple[str, list[str]]) -> None:
    """tree lists the root of the default branch."""
    base, _ = content_repo

    answer = get(node, f"{base}/tree")

    body = answer.json()
    assert body["path"] == ""
    entries = {e["name"]: e for e in body["entries"]}
    assert set(entries) == {"README.md", "bin", "docs"}
    readme = entries["README.md"]
    assert readme["type"] == "blob"
    assert readme["mode"] == "100644"
    assert readme["size"] == len(b"# hello again\n")
    assert len(readme["hash"]) == 40
    assert entries["docs"]["type"] == "tree"


def test_tree_of_a_directory_and_a_ref(
    node: NodeProcess, content_repo: tuple[str, list[str]]
) -> None:
    """tree/{path} lists a directory; ?ref= picks the revision."""
    base, _ = content_repo

    docs = get(node, f"{base}/tree/docs")
    topic = get(node, f"{base}/tree?ref=topic")

    assert docs.json()["path"] == "docs"
    assert [e["name"] for e in docs.json()["entries"]] == ["guide.md"]
    assert "topic.txt" in {e["name"] for e in topic.json()["entries"]}


def test_tree_of_a_missing_directory_is_not_found(
    node: NodeProcess, content_repo: tuple[str, list[str]]
) -> None:
    """A directory that does not exist is 404 not_found."""
    base, _ = content_repo

    answer = get(node, f"{base}/tree/nowhere")

    assert answer.status == 404
    assert answer.json()["error"] == "not_found"


def test_tree_of_an_empty_repo_is_empty(node: NodeProcess) -> None:
    """The root of a repository without commits has no entries."""
    agent = Agent()
    create(node, agent, "hollow")

    answer = get(node, f"/api/v1/repos/{agent.key.short}/hollow/tree")

    assert answer.json() == {"entries": [], "path": ""}


def test_blob_is_raw_bytes(
    node: NodeProcess, content_repo: tuple[str, list[str]]
) -> None:
    """blob/{path} answers the file's bytes as application/octet-stream."""
    base, _ = content_repo

    answer = get(node, f"{base}/blob/bin/data")

    assert answer.status == 200
    assert answer.body == bytes(range(256))
    assert answer.headers["Content-Type"] == "application/octet-stream"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"


def test_blob_at_a_ref(node: NodeProcess, content_repo: tuple[str, list[str]]) -> None:
    """?ref= reads the file at another revision."""
    base, hashes = content_repo

    answer = get(node, f"{base}/blob/README.md?ref={hashes[0]}")

    assert answer.body == b"# hello\n"


@pytest.mark.parametrize("path", ["missing.txt", "docs", "docs/guide.md/x"])
def test_blob_that_is_no_file_is_not_found(
    node: NodeProcess, content_repo: tuple[str, list[str]], path: str
) -> None:
    """A path that is not a file is 404 not_found in JSON."""
    base, _ = content_repo

    answer = get(node, f"{base}/blob/{path}")

    assert answer.status == 404
    assert answer.json()["error"] == "not_found"


@pytest.mark.parametrize("path", ["a//b", "docs/./guide.md", "docs/%2e%2e/README.md"])
def test_blob_with_a_dot_path_is_refused(
    node: NodeProcess, content_repo: tuple[str, list[str]], path: str
) -> None:
    """Empty, '.' and '..' components are refused (never resolved)."""
    base, _ = content_repo

    answer = get(node, f"{base}/blob/{path}")

    assert answer.status == 400
    assert answer.json()["error"] == "bad_request"


def test_replicas_of_a_repo_without_any(node: NodeProcess) -> None:
    """replicas answers the protocol's shape, empty for a new repository."""
    agent = Agent()
    create(node, agent, "lonely")

    answer = get(node, f"/api/v1/repos/{agent.did}/lonely/replicas")

    assert answer.json() == {
        "repo": f"{agent.key.short}/lonely",
        "replica_count": 0,
        "replicas": [],
    }


def test_replicas_are_listed_with_the_fields_gl_reads(node: NodeProcess) -> None:
    """Each replica has replica_did, replica_url and registered_at."""
    agent, mirror = Agent(), Agent()
    repo = create(node, agent, "copied").json()
    sql(
        node,
        "INSERT INTO replicas (repo_id, url, node_did) VALUES (%s, %s, %s)",
        (repo["id"], "http://mirror.example:7545", mirror.did),
    )

    answer = get(node, f"/api/v1/repos/{agent.did}/copied/replicas")

    body = answer.json()
    assert body["replica_count"] == 1
    replica = body["replicas"][0]
    assert replica["replica_did"] == mirror.did
    assert replica["replica_url"] == "http://mirror.example:7545"
    assert replica["registered_at"].endswith("+00:00")


# -- Errors common to the API ----------------------------------------------------------


def test_unknown_route_is_json_not_found(node: NodeProcess) -> None:
    """A route that does not exist is a JSON 404."""
    answer = get(node, "/api/v1/nothing/here")

    assert answer.status == 404
    assert answer.json()["error"] == "not_found"


def test_wrong_method_is_json_method_not_allowed(node: NodeProcess) -> None:
    """A known path with a method it does not take is a JSON 405 with Allow."""
    answer = request("PATCH", node.url + "/api/v1/repos")

    assert answer.status == 405
    assert answer.json()["error"] == "method_not_allowed"
    assert "POST" in answer.headers["Allow"]


# -- Rate limits -----------------------------------------------------------------------


def test_create_is_rate_limited_per_signer(
    start_node: Callable[..., NodeProcess],
) -> None:
    """Past GITLAWB_SIGNER_RATE_LIMIT creates an hour a signer gets 429."""
    node = start_node(GITLAWB_SIGNER_RATE_LIMIT="2")
    agent, other = Agent(), Agent()

    statuses = [create(node, agent, f"r{n}").status for n in range(3)]
    fork = agent.call(node, "POST", f"/api/v1/repos/{agent.did}/r0/fork", {"name": "f"})
    someone_else = create(node, other, "r0")

    assert statuses == [201, 201, 429]
    assert fork.status == 429
    assert fork.json()["error"] == "rate_limited"
    assert int(fork.headers["Retry-After"]) > 0
    assert someone_else.status == 201


def test_create_is_rate_limited_per_ip(start_node: Callable[..., NodeProcess]) -> None:
    """Past GITLAWB_CREATE_RATE_LIMIT creates an hour from one IP, 429."""
    node = start_node(GITLAWB_CREATE_RATE_LIMIT="2")

    statuses = [create(node, Agent(), "ip").status for _ in range(3)]

    assert statuses == [201, 201, 429]


def test_refused_body_costs_no_rate_limit_hit(
    start_node: Callable[..., NodeProcess],
) -> None:
    """A create refused for its body does not count against the signer's limit."""
    node = start_node(GITLAWB_SIGNER_RATE_LIMIT="1")
    agent = Agent()

    bad = create(node, agent, "bad name")
    good = create(node, agent, "good")

    assert (bad.status, good.status) == (400, 201)


def test_repositories_dir_is_not_touched_by_refused_creates(node: NodeProcess) -> None:
    """A refused create leaves nothing on disk."""
    agent = Agent()

    create(node, agent, "bad name")

    assert not (node.data_dir / "repos" / agent.key.short).exists()

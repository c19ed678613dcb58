"""
Tests for fetching the real gl client and for the environment it runs in.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest

from tests.interop import glclient
from tests.interop.glclient import (
    GlClientFetchError,
    extract_binaries,
    gl_binaries,
    gl_env,
)


def _tarball(path: Path, members: dict[str, bytes], links: dict[str, str]) -> Path:
    """
    Write a gzip tarball with the given regular files and symbolic links.
    """
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            archive.addfile(info)
    return path


def _package(path: Path) -> Path:
    """
    Write a tarball shaped like the npm package, with stand-in binaries.
    """
    return _tarball(
        path,
        {
            "package/gl": b"#!/bin/sh\necho gl\n",
            "package/git-remote-gitlawb": b"#!/bin/sh\necho helper\n",
            "package/package.json": b"{}",
        },
        {},
    )


def _fake_npm(bin_dir: Path, script: str) -> None:
    """
    Put an executable C{npm} running C{script} (a shell body) in C{bin_dir}.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + script)
    npm.chmod(0o755)


def test_extract_writes_both_binaries_executable(tmp_path: Path) -> None:
    """
    Both binaries are written under their own names with mode 0755.
    """
    tarball = _package(tmp_path / "p.tgz")

    extract_binaries(tarball, tmp_path / "bin")

    for name in ("gl", "git-remote-gitlawb"):
        path = tmp_path / "bin" / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert (tmp_path / "bin" / "gl").read_bytes() == b"#!/bin/sh\necho gl\n"
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == [
        "git-remote-gitlawb",
        "gl",
    ]


def test_extract_refuses_symlink_member(tmp_path: Path) -> None:
    """
    A binary that is a symbolic link in the archive is refused, not followed.
    """
    tarball = _tarball(
        tmp_path / "p.tgz",
        {"package/git-remote-gitlawb": b"x"},
        {"package/gl": "/etc/passwd"},
    )

    with pytest.raises(GlClientFetchError, match="not a regular file"):
        extract_binaries(tarball, tmp_path / "bin")

    assert not (tmp_path / "bin" / "gl").exists()


def test_extract_never_writes_other_members(tmp_path: Path) -> None:
    """
    Members other than the two binaries, such as a path escaping the
    destination, are never written.
    """
    tarball = _tarball(
        tmp_path / "p.tgz",
        {
            "package/gl": b"a",
            "package/git-remote-gitlawb": b"b",
            "../escaped": b"c",
            "/tmp/absolute-escape": b"d",
        },
        {},
    )
    dest = tmp_path / "deep" / "bin"

    extract_binaries(tarball, dest)

    assert not (tmp_path / "deep" / "escaped").exists()
    assert sorted(p.name for p in dest.iterdir()) == ["git-remote-gitlawb", "gl"]


def test_extract_refuses_missing_member(tmp_path: Path) -> None:
    """
    An archive without the remote helper is refused.
    """
    tarball = _tarball(tmp_path / "p.tgz", {"package/gl": b"a"}, {})

    with pytest.raises(GlClientFetchError, match="no package/git-remote-gitlawb"):
        extract_binaries(tarball, tmp_path / "bin")


def test_binaries_none_without_npm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    With nothing cached and no npm on PATH the answer is None (tests skip).
    """
    monkeypatch.setenv("GITLAWB_GL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))

    assert gl_binaries() is None


def test_binaries_cached_need_no_npm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Binaries already in the cache are used even when npm is absent.
    """
    monkeypatch.setenv("GITLAWB_GL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    extract_binaries(_package(tmp_path / "p.tgz"), tmp_path / "cache" / "bin")

    binaries = gl_binaries()

    assert binaries == (
        tmp_path / "cache" / "bin" / "gl",
        tmp_path / "cache" / "bin" / "git-remote-gitlawb",
    )


def test_binaries_raise_npm_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A failing npm raises with npm's own error text, and leaves no bin dir.
    """
    _fake_npm(tmp_path / "fakebin", "echo 'npm error code E404' >&2\nexit 1\n")
    monkeypatch.setenv("GITLAWB_GL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "fakebin"))

    with pytest.raises(GlClientFetchError, match="E404"):
        gl_binaries()

    assert not (tmp_path / "cache" / "bin").exists()


def test_binaries_refuse_unexpected_tarball(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A tarball whose SHA-256 is not the pinned one is refused.
    """
    fake = _package(tmp_path / "fake.tgz")
    _fake_npm(tmp_path / "fakebin", f"/bin/cp {fake} ./pkg.tgz\n")
    monkeypatch.setenv("GITLAWB_GL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "fakebin"))

    with pytest.raises(GlClientFetchError, match="SHA-256"):
        gl_binaries()

    assert not (tmp_path / "cache" / "bin").exists()


def test_binaries_fetched_once_by_concurrent_callers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Callers racing on an empty cache run npm once between them.
    """
    fake = _package(tmp_path / "fake.tgz")
    calls = tmp_path / "npm-calls"
    _fake_npm(tmp_path / "fakebin", f"echo x >> {calls}\n/bin/cp {fake} ./pkg.tgz\n")
    monkeypatch.setenv("GITLAWB_GL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "fakebin"))
    digest = hashlib.sha256(fake.read_bytes()).hexdigest()
    monkeypatch.setattr(glclient, "GL_TARBALL_SHA256", digest)
    results: list[tuple[Path, Path] | None] = []

    threads = [
        threading.Thread(target=lambda: results.append(gl_binaries())) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert calls.read_text() == "x\n"
    assert len(results) == 4
    assert len(set(results)) == 1
    assert [
        p.name for p in os.scandir(tmp_path / "cache") if p.name.startswith(".fetch-")
    ] == []


def test_env_targets_only_loopback(tmp_path: Path) -> None:
    """
    The node URL loses a trailing slash and every proxy is a dead loopback
    port with only loopback hosts exempt.
    """
    env = gl_env(tmp_path, "http://127.0.0.1:7545/")

    assert env["GITLAWB_NODE"] == "http://127.0.0.1:7545"
    assert env["HOME"] == str(tmp_path)
    assert env["HTTPS_PROXY"] == "http://127.0.0.1:9"
    assert env["https_proxy"] == "http://127.0.0.1:9"
    assert set(env["NO_PROXY"].split(",")) == {"127.0.0.1", "localhost", "::1"}
    assert env["GITLAWB_ICAPTCHA_URL"].startswith("http://127.0.0.1:7545/")


def test_env_path_finds_remote_helper_first(tmp_path: Path) -> None:
    """
    PATH starts with the cache's bin directory so git finds the helper.
    """
    env = gl_env(tmp_path, "http://localhost:7545")

    assert env["PATH"].split(os.pathsep)[0] == str(glclient.gl_bin_dir())


@pytest.mark.parametrize(
    "url",
    ["https://127.0.0.1:7545", "http://10.0.0.1:7545", "http://example.org"],
)
def test_env_refuses_non_loopback_node(tmp_path: Path, url: str) -> None:
    """
    A node URL that is not plain http on loopback is refused.
    """
    with pytest.raises(ValueError, match="loopback"):
        gl_env(tmp_path, url)


@pytest.mark.interop
def test_real_clients_report_their_version(tmp_path: Path) -> None:
    """
    The fetched binaries run and are version 0.7.1.
    """
    binaries = gl_binaries()
    if binaries is None:
        pytest.skip(glclient.NPM_MISSING_REASON)
    gl, helper = binaries
    env = gl_env(tmp_path, "http://127.0.0.1:7545")

    gl_out = subprocess.run(
        [gl, "--version"], env=env, capture_output=True, text=True, check=True
    )
    helper_out = subprocess.run(
        [helper, "--version"], env=env, capture_output=True, text=True, check=True
    )

    assert gl_out.stdout.strip() == "gl 0.7.1"
    assert helper_out.stdout.strip() == "git-remote-gitlawb 0.7.1"

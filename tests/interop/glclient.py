"""
The real gitlawb clients, C{gl} and C{git-remote-gitlawb} 0.7.1, for the
interoperability tests.

The binaries come from the npm registry (C{npm pack
@gitlawb/gl-linux-x64@0.7.1}) and are cached, so only the first test process
of a machine downloads them; a file lock keeps parallel test processes from
fetching at the same time.  L{gl_env} builds an environment in which the
clients talk to a node on loopback and to nothing else.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

#: The client version the node must stay compatible with.
GL_VERSION = "0.7.1"

#: The npm package that ships both binaries for Linux x86-64.
GL_PACKAGE = f"@gitlawb/gl-linux-x64@{GL_VERSION}"

#: SHA-256 of the package tarball: a republished or altered package is refused.
GL_TARBALL_SHA256 = "d2f9c7a36652edc4d7c3a6884ecb25c0f3371d97ac4fe5a757f06cad8977bd60"

#: Why the interop tests skip when the binaries cannot be had.
NPM_MISSING_REASON = "npm is not installed: cannot fetch the gl client"

#: Tarball member -> file name in the cache; nothing else is ever extracted.
_MEMBERS = {
    "package/gl": "gl",
    "package/git-remote-gitlawb": "git-remote-gitlawb",
}

# The download is 8.5 MB; a registry that has not answered by then will not.
_NPM_TIMEOUT_SECONDS = 600

# Every client request to a host other than the node goes to this proxy,
# where normally nothing listens (TCP port 9 is "discard"), so it fails at once.
_DEAD_PROXY = "http://127.0.0.1:9"

# Hosts the clients may reach directly (the node's own host is added).
_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")

_REPO_ROOT = Path(__file__).resolve().parents[2]


class GlClientFetchError(RuntimeError):
    """
    The client binaries could not be fetched or unpacked.
    """


def gl_cache_dir() -> Path:
    """
    The cache directory: C{$GITLAWB_GL_CACHE}, else C{<repo>/.cache/gl-0.7.1}.
    """
    configured = os.environ.get("GITLAWB_GL_CACHE")
    if configured:
        return Path(configured)
    return _REPO_ROOT / ".cache" / f"gl-{GL_VERSION}"


def gl_bin_dir() -> Path:
    """
    The directory that holds both binaries once they are fetched.
    """
    return gl_cache_dir() / "bin"


def gl_binaries() -> tuple[Path, Path] | None:
    """
    Paths of C{gl} and C{git-remote-gitlawb}, fetched with npm if not cached.

    @return: C{None} only when the binaries are not cached and npm is not
        installed (the caller skips); otherwise both paths, executable.
    @raise GlClientFetchError: npm failed, timed out, or delivered a tarball
        that is not the expected one.
    """
    bin_dir = gl_bin_dir()
    gl = bin_dir / "gl"
    helper = bin_dir / "git-remote-gitlawb"

    # The bin directory is published by one rename, so when both files are
    # there they are complete and no lock is needed to use them.
    if _executable(gl) and _executable(helper):
        return gl, helper

    npm = shutil.which("npm")
    if npm is None:
        return None

    cache = gl_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache / ".lock"):
        # Another process may have fetched them while this one waited.
        if not (_executable(gl) and _executable(helper)):
            _fetch(npm, cache, bin_dir)
    return gl, helper


def gl_env(home: Path, node_url: str) -> dict[str, str]:
    """
    A complete environment (not an overlay) for running the clients against
    one node on loopback.

    C{HOME} holds the client's identity (C{~/.gitlawb}); C{PATH} starts with
    the cache's bin directory so that C{git} finds C{git-remote-gitlawb}.
    Call L{gl_binaries} first.  Every other service URL the clients know (the
    iCaptcha service, IPFS and Arweave gateways, the chain RPC) is pointed at
    loopback, and every proxy variable at a dead loopback port with only
    loopback hosts exempt, so that any other request (such as C{gl doctor}'s
    release check) fails at once instead of leaving the machine.

    @param home: the home directory of the simulated user.
    @param node_url: the node's base URL, e.g. C{http://127.0.0.1:7545}.
    @raise ValueError: C{node_url} is not an http URL on a loopback host.
    """
    # The clients join paths to GITLAWB_NODE verbatim: a trailing slash would
    # make every request target start with "//".
    node = node_url.rstrip("/")
    parts = urlsplit(node)
    if parts.scheme != "http" or not _is_loopback(parts.hostname):
        raise ValueError(f"node URL must be http:// on loopback, not {node_url!r}")

    path = [str(gl_bin_dir())]
    git = shutil.which("git")
    if git is not None:
        path.append(str(Path(git).parent))
    path += ["/usr/local/bin", "/usr/bin", "/bin"]

    no_proxy = ",".join(dict.fromkeys([parts.hostname or "", *_LOOPBACK_NAMES]))
    env = {
        "HOME": str(home),
        "PATH": os.pathsep.join(dict.fromkeys(path)),
        "LC_ALL": "C.UTF-8",
        "NO_COLOR": "1",
        # gl and the remote helper.
        "GITLAWB_NODE": node,
        "GITLAWB_KEY": str(home / ".gitlawb" / "identity.pem"),
        "GITLAWB_LOG": "warn",
        # gl asks this service for a challenge when a node answers 403 with
        # an x-icaptcha-level header; without INSECURE it would ignore a
        # plain-http URL and use its built-in public one.
        "GITLAWB_ICAPTCHA_URL": f"{node}/icaptcha",
        "GITLAWB_ICAPTCHA_INSECURE": "1",
        "GITLAWB_IPFS_GATEWAY": _DEAD_PROXY,
        "GITLAWB_IPFS_GATEWAYS": _DEAD_PROXY,
        "GITLAWB_ARWEAVE_GATEWAY": _DEAD_PROXY,
        "GITLAWB_CHAIN_RPC_URL": _DEAD_PROXY,
        # Everything not exempt (e.g. `gl doctor`'s release check) fails fast.
        "HTTP_PROXY": _DEAD_PROXY,
        "HTTPS_PROXY": _DEAD_PROXY,
        "ALL_PROXY": _DEAD_PROXY,
        "http_proxy": _DEAD_PROXY,
        "https_proxy": _DEAD_PROXY,
        "all_proxy": _DEAD_PROXY,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
        # git: no system or user configuration leaks in, never prompt.
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": "gitlawb interop",
        "GIT_AUTHOR_EMAIL": "interop@gitlawb.invalid",
        "GIT_COMMITTER_NAME": "gitlawb interop",
        "GIT_COMMITTER_EMAIL": "interop@gitlawb.invalid",
    }
    return env


def extract_binaries(tarball: Path, dest: Path) -> None:
    """
    Write the two binaries of the package C{tarball} into C{dest}, mode 0755.

    Only the two expected members are read, each must be a regular file, and
    each is written under a fixed name: nothing in the archive chooses a
    path, a link target or a mode.

    @raise GlClientFetchError: a member is missing or not a regular file.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "r:gz") as archive:
        for member_name, file_name in _MEMBERS.items():
            try:
                member = archive.getmember(member_name)
            except KeyError:
                raise GlClientFetchError(
                    f"{tarball.name} has no {member_name}"
                ) from None
            if not member.isreg():
                raise GlClientFetchError(
                    f"{tarball.name}: {member_name} is not a regular file"
                )
            source = archive.extractfile(member)
            if source is None:
                raise GlClientFetchError(f"{tarball.name}: cannot read {member_name}")
            target = dest / file_name
            with source, open(target, "xb") as out:
                shutil.copyfileobj(source, out)
            target.chmod(0o755)


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _fetch(npm: str, cache: Path, bin_dir: Path) -> None:
    """
    Download the package with npm, check it, and publish C{bin_dir}.

    Runs under the cache lock.  The binaries are unpacked in a scratch
    directory inside the cache and moved into place with one rename, so a
    crash leaves either no bin directory or a complete one.
    """
    scratch = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
    try:
        # Download: npm verifies the registry's integrity hash, and the pinned
        # SHA-256 below guards against a different tarball under the name.
        try:
            result = subprocess.run(
                [
                    npm,
                    "pack",
                    GL_PACKAGE,
                    "--ignore-scripts",
                    "--pack-destination",
                    ".",
                ],
                cwd=scratch,
                capture_output=True,
                text=True,
                timeout=_NPM_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise GlClientFetchError(
                f"npm pack {GL_PACKAGE} did not finish in {e.timeout:.0f} s"
            ) from e
        if result.returncode != 0:
            raise GlClientFetchError(
                f"npm pack {GL_PACKAGE} failed with exit code {result.returncode}:\n"
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        tarballs = sorted(scratch.glob("*.tgz"))
        if len(tarballs) != 1:
            raise GlClientFetchError(
                f"npm pack {GL_PACKAGE} left {len(tarballs)} tarballs, expected one"
            )
        tarball = tarballs[0]

        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        if digest != GL_TARBALL_SHA256:
            raise GlClientFetchError(
                f"{tarball.name} has SHA-256 {digest}, expected {GL_TARBALL_SHA256}"
            )

        # Unpack, then publish both binaries at once.
        staged = scratch / "bin"
        extract_binaries(tarball, staged)
        if bin_dir.exists():
            shutil.rmtree(bin_dir)
        os.replace(staged, bin_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


#: No client command may take longer: a hang fails the test.
CLIENT_TIMEOUT = 120


@dataclass
class GlUser:
    """
    One client user: a home directory (its C{~/.gitlawb}) and the closed
    environment the clients run in, aimed at one node.
    """

    home: Path
    node: NodeProcess
    did: str = ""

    @property
    def short(self) -> str:
        return self.did.rsplit(":", 1)[1]

    def run(
        self,
        *args: str,
        cwd: Path | None = None,
        check: bool = True,
        input: bytes | None = None,
        timeout: float = CLIENT_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """
        Run a command (C{gl ...} or C{git ...}) as this user.

        @raise AssertionError: C{check} and it exited non-zero.
        """
        done = subprocess.run(
            list(args),
            cwd=cwd or self.home,
            env=gl_env(self.home, self.node.url),
            input=input,
            capture_output=True,
            timeout=timeout,
        )
        result = subprocess.CompletedProcess(
            done.args,
            done.returncode,
            done.stdout.decode("utf-8", "replace"),
            done.stderr.decode("utf-8", "replace"),
        )
        if check:
            assert result.returncode == 0, (
                f"{' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def git(self, *args: str, cwd: Path | None = None) -> str:
        """
        Run C{git args}; return its standard output.
        """
        return self.run("git", *args, cwd=cwd).stdout

    def gl(self, *args: str, check: bool = True) -> str:
        """
        Run C{gl args}; return its standard output.
        """
        return self.run("gl", *args, check=check).stdout


if TYPE_CHECKING:
    from tests.support import NodeProcess

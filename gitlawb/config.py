"""
The node's settings: one frozen object, read from the environment and from the
command-line flags of the twistd plugin (a flag wins over the environment).

Each setting is declared once, in L{SETTINGS}: its environment name, the flag
that overrides it, the parser that turns text into a value, the default and a
line of help.  The plugin's C{Options}, the README table and the validation all
come from that one table.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import psycopg2.extensions


class ConfigError(ValueError):
    """
    A setting has a value the node cannot use.

    C{str()} of the error is the one line printed at start-up: it names the
    setting and says what it accepts.
    """

    def __init__(self, name: str, value: str, accepts: str) -> None:
        self.name = name
        self.value = value
        self.accepts = accepts
        super().__init__(f"{name}={value!r} is not valid: {accepts}")


# Parsers: each takes the raw text and returns the value, or raises ValueError
# with a short description of what it accepts.


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError
    return value


_port.accepts = "a TCP/UDP port number from 0 to 65535"  # type: ignore[attr-defined]


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError
    return value


_non_negative_float.accepts = "a number of seconds, 0 or more"  # type: ignore[attr-defined]


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError
    return value


_positive_float.accepts = "a number greater than 0"  # type: ignore[attr-defined]


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


_non_negative_int.accepts = "a whole number, 0 or more"  # type: ignore[attr-defined]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


_positive_int.accepts = "a whole number, 1 or more"  # type: ignore[attr-defined]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError


_boolean.accepts = "true or false (also 1/0, yes/no, on/off)"  # type: ignore[attr-defined]


def _text(text: str) -> str:
    return text


_text.accepts = "any text"  # type: ignore[attr-defined]


def _expand(text: str) -> Path:
    try:
        return Path(text).expanduser()
    except RuntimeError:
        # "~someone" when there is no such user (or no home directory).
        raise ValueError from None


def _path(text: str) -> Path | None:
    if not text:
        return None
    return _expand(text)


_path.accepts = "a filesystem path"  # type: ignore[attr-defined]


def _required_path(text: str) -> Path:
    if not text.strip():
        raise ValueError
    return _expand(text)


_required_path.accepts = "a filesystem path (not empty)"  # type: ignore[attr-defined]


def _host(text: str) -> str:
    text = text.strip()
    if not text or any(c in text for c in "/ ?#@"):
        raise ValueError
    return text


_host.accepts = "an IP address or host name to listen on"  # type: ignore[attr-defined]


def _ip_address(text: str) -> str:
    return str(ipaddress.ip_address(text.strip().strip("[]")))


_ip_address.accepts = "an IPv4 or IPv6 address to listen on"  # type: ignore[attr-defined]


def _http_url(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    parts = urlsplit(text)
    # Reading .port raises ValueError for a port that is not a number up to
    # 65535; port 0 cannot be reached either.
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port == 0:
        raise ValueError
    return text.rstrip("/")


_http_url.accepts = "an http:// or https:// URL"  # type: ignore[attr-defined]


def _database_url(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    if urlsplit(text).scheme not in ("postgres", "postgresql"):
        raise ValueError

    # libpq's own parser: an unknown query parameter or a port that is not a
    # number would otherwise only show up as a connection that keeps failing.
    try:
        parsed = psycopg2.extensions.parse_dsn(text)
    except psycopg2.ProgrammingError:
        raise ValueError from None
    for port in parsed.get("port", "").split(","):
        if port:
            _port(port)
    return text


_database_url.accepts = (  # type: ignore[attr-defined]
    "a postgresql://user@host:port/dbname URL, or empty for the embedded database"
)


def _host_port(text: str) -> tuple[str, int] | None:
    text = text.strip()
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError
    host = host.strip("[]")
    if not host:
        raise ValueError
    ipaddress.ip_address(host) if host[0].isdigit() or ":" in host else _host(host)
    return host, _port(port)


_host_port.accepts = "host:port (e.g. 127.0.0.1:9091), or empty for off"  # type: ignore[attr-defined]


def _url_list(text: str) -> tuple[str, ...]:
    return tuple(_http_url(item) or "" for item in _split_list(text))


_url_list.accepts = "a comma-separated list of http(s) URLs"  # type: ignore[attr-defined]


def _multiaddr_list(text: str) -> tuple[str, ...]:
    items = _split_list(text)
    for item in items:
        if not item.startswith("/"):
            raise ValueError
    return tuple(items)


_multiaddr_list.accepts = "a comma-separated list of multiaddrs (/ip4/.../p2p/...)"  # type: ignore[attr-defined]


def _eth_address(text: str) -> str:
    text = text.strip()
    if text and not re.fullmatch(r"0x[0-9a-fA-F]{40}", text):
        raise ValueError
    return text


_eth_address.accepts = "a 0x-prefixed 20-byte hex address, or empty"  # type: ignore[attr-defined]


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@dataclass(frozen=True)
class Setting:
    """
    One setting: where it comes from, how it is parsed and its default.

    @ivar attribute: the attribute name on L{Settings}.
    @ivar env: the environment variable.
    @ivar flag: the long command-line flag of the twistd plugin, without C{--}.
    @ivar parse: turns the text into the value; raises C{ValueError}.
    @ivar default: the text used when neither the flag nor the environment is set.
    """

    attribute: str
    env: str
    parse: Callable[[str], Any]
    default: str
    help: str
    secret: bool = False

    @property
    def flag(self) -> str:
        return self.attribute.replace("_", "-")

    @property
    def accepts(self) -> str:
        return str(getattr(self.parse, "accepts", "a valid value"))


SETTINGS: tuple[Setting, ...] = (
    Setting("data_dir", "GITLAWB_DATA_DIR", _required_path, "./gitlawb-data",
            "Directory for repos/, the embedded database and the node key."),
    Setting("host", "GITLAWB_HOST", _host, "127.0.0.1",
            "Address the HTTP API and git smart HTTP listen on."),
    Setting("port", "GITLAWB_PORT", _port, "7545",
            "Port of the HTTP API and git smart HTTP (0 picks a free one)."),
    Setting("public_url", "GITLAWB_PUBLIC_URL", _http_url, "",
            "URL clients and peers reach this node at (default http://host:port)."),
    Setting("repos_dir", "GITLAWB_REPOS_DIR", _path, "",
            "Where bare repositories live (default DATA_DIR/repos)."),
    Setting("key", "GITLAWB_KEY", _path, "",
            "Node Ed25519 key, PEM PKCS#8 (default DATA_DIR/identity.pem)."),
    Setting("database_url", "DATABASE_URL", _database_url, "",
            "PostgreSQL URL; empty runs an embedded PostgreSQL in DATA_DIR/postgres.",
            secret=True),
    Setting("p2p_port", "GITLAWB_P2P_PORT", _port, "7546",
            "libp2p port (QUIC on UDP and TCP); 0 turns the swarm off."),
    Setting("p2p_host", "GITLAWB_P2P_HOST", _ip_address, "0.0.0.0",
            "Address libp2p listens on (all interfaces by default)."),
    Setting("p2p_bootstrap", "GITLAWB_P2P_BOOTSTRAP", _multiaddr_list, "",
            "libp2p multiaddrs to dial at start."),
    Setting("metrics_addr", "GITLAWB_METRICS_ADDR", _host_port, "",
            "host:port of the Prometheus listener; empty = off."),
    Setting("metrics_max_repos", "GITLAWB_METRICS_MAX_REPOS", _positive_int, "500",
            "Distinct repo label values before counting under repo=\"_other\"."),
    Setting("shutdown_grace_secs", "GITLAWB_SHUTDOWN_GRACE_SECS",
            _non_negative_float, "30",
            "Seconds in-flight work may take to finish after SIGTERM/SIGINT."),
    Setting("db_retry_initial_secs", "GITLAWB_DB_RETRY_INITIAL_SECS",
            _positive_float, "5", "First wait before retrying an unreachable DB."),
    Setting("db_retry_max_secs", "GITLAWB_DB_RETRY_MAX_SECS", _positive_float, "60",
            "Longest wait between database connection attempts."),
    Setting("db_pool_size", "GITLAWB_DB_POOL_SIZE", _positive_int, "5",
            "Connections in the database pool."),
    Setting("enforce_owner_push", "GITLAWB_ENFORCE_OWNER_PUSH", _boolean, "false",
            "Only a repository's owner may push to it."),
    Setting("max_pack_bytes", "GITLAWB_MAX_PACK_BYTES", _positive_int,
            str(2 * 1024**3), "Largest push body accepted (413 above)."),
    Setting("git_service_timeout_secs", "GITLAWB_GIT_SERVICE_TIMEOUT_SECS",
            _positive_float, "600", "Longest a git child may run (504 after)."),
    Setting("git_max_reads", "GITLAWB_GIT_MAX_READS", _positive_int, "32",
            "Concurrent upload-pack (clone/fetch) processes."),
    Setting("git_max_writes", "GITLAWB_GIT_MAX_WRITES", _positive_int, "8",
            "Concurrent receive-pack (push) processes."),
    Setting("signer_rate_limit", "GITLAWB_SIGNER_RATE_LIMIT", _non_negative_int,
            "10", "Creates (repo, register, fork) per signer per hour; 0 = off."),
    Setting("create_rate_limit", "GITLAWB_CREATE_RATE_LIMIT", _non_negative_int,
            "120", "Creates per client IP per hour; 0 = off."),
    Setting("push_rate_limit", "GITLAWB_PUSH_RATE_LIMIT", _non_negative_int, "600",
            "Push requests per client IP per hour; 0 = off."),
    Setting("sync_trigger_rate_limit", "GITLAWB_SYNC_TRIGGER_RATE_LIMIT",
            _non_negative_int, "60", "sync/trigger calls per client IP per hour."),
    Setting("peer_write_rate_limit", "GITLAWB_PEER_WRITE_RATE_LIMIT",
            _non_negative_int, "600", "Peer announces/notifies per IP per hour."),
    Setting("access_log", "GITLAWB_ACCESS_LOG", _boolean, "true",
            "Log one line per HTTP request (metrics count them either way)."),
    Setting("trusted_proxy", "GITLAWB_TRUSTED_PROXY", _boolean, "false",
            "Take the client IP from X-Forwarded-For's rightmost entry."),
    Setting("bootstrap_peers", "GITLAWB_BOOTSTRAP_PEERS", _url_list, "",
            "HTTP URLs of peer nodes to announce to at start."),
    Setting("require_signed_peer_writes", "GITLAWB_REQUIRE_SIGNED_PEER_WRITES",
            _boolean, "false", "Peer announces must be signed by the peer's DID."),
    Setting("allow_private_peers", "GITLAWB_ALLOW_PRIVATE_PEERS", _boolean, "false",
            "Accept peers on loopback/private addresses (a private cluster)."),
    Setting("allow_private_webhooks", "GITLAWB_ALLOW_PRIVATE_WEBHOOKS", _boolean,
            "false", "Allow webhook URLs on loopback/private addresses."),
    Setting("auto_sync", "GITLAWB_AUTO_SYNC", _boolean, "true",
            "Mirror repositories that peers announce."),
    Setting("sync_max_attempts", "GITLAWB_SYNC_MAX_ATTEMPTS", _positive_int, "8",
            "Attempts before a sync row is recorded failed."),
    Setting("webhook_max_attempts", "GITLAWB_WEBHOOK_MAX_ATTEMPTS", _positive_int,
            "8", "Attempts before a webhook delivery is recorded failed."),
    Setting("webhook_max_age_secs", "GITLAWB_WEBHOOK_MAX_AGE_SECS", _positive_float,
            "86400", "Seconds after a push its webhook deliveries are retried."),
    Setting("webhook_connect_timeout_secs", "GITLAWB_WEBHOOK_CONNECT_TIMEOUT_SECS",
            _positive_float, "10",
            "Seconds to resolve a webhook host, and again to connect to it."),
    Setting("webhook_timeout_secs", "GITLAWB_WEBHOOK_TIMEOUT_SECS", _positive_float,
            "10", "Seconds a webhook receiver has to answer, after the connect."),
    Setting("webhook_retry_base_secs", "GITLAWB_WEBHOOK_RETRY_BASE_SECS",
            _positive_float, "10",
            "Wait before a webhook's first retry; doubled for each next one."),
    Setting("webhook_retry_max_secs", "GITLAWB_WEBHOOK_RETRY_MAX_SECS",
            _positive_float, "3600", "Longest wait between webhook attempts."),
    Setting("webhook_concurrency", "GITLAWB_WEBHOOK_CONCURRENCY", _positive_int,
            "16", "Webhook deliveries in flight at once."),
    Setting("webhook_per_host_concurrency", "GITLAWB_WEBHOOK_PER_HOST_CONCURRENCY",
            _positive_int, "2", "Webhook deliveries in flight to one host at once."),
    Setting("peer_timeout_secs", "GITLAWB_PEER_TIMEOUT_SECS", _positive_float, "5",
            "Bound on each outbound call to a peer."),
    Setting("sync_git_timeout_secs", "GITLAWB_SYNC_GIT_TIMEOUT_SECS",
            _positive_float, "600",
            "Longest one git clone/fetch of a mirror may run (killed after)."),
    Setting("sync_concurrency", "GITLAWB_SYNC_CONCURRENCY", _positive_int, "2",
            "Repositories one node mirrors at the same time."),
    Setting("contract_node_staking", "GITLAWB_CONTRACT_NODE_STAKING", _text, "",
            "Address of the node-staking contract (heartbeat off when empty)."),
    Setting("operator_private_key", "GITLAWB_OPERATOR_PRIVATE_KEY", _text, "",
            "Operator key that signs heartbeats.", secret=True),
    Setting("operator_strict_mode", "GITLAWB_OPERATOR_STRICT_MODE", _boolean,
            "false", "Refuse to start when the node is not registered on chain."),
    Setting("heartbeat_interval_hours", "GITLAWB_HEARTBEAT_INTERVAL_HOURS",
            _positive_float, "20", "Hours between operator heartbeats."),
    Setting("chain_rpc_url", "GITLAWB_CHAIN_RPC_URL", _text, "",
            "JSON-RPC URL of the chain the staking contract lives on."),
    Setting("contract_did_registry", "GITLAWB_CONTRACT_DID_REGISTRY", _eth_address,
            "", "Address of the DID registry contract (served by /api/v1/contracts)."),
    Setting("contract_name_registry", "GITLAWB_CONTRACT_NAME_REGISTRY",
            _eth_address, "",
            "Address of the name registry contract (served by /api/v1/contracts)."),
)  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """
    Every setting of the node, parsed and checked.
    """

    data_dir: Path
    host: str
    port: int
    public_url: str | None
    repos_dir: Path | None
    key: Path | None
    database_url: str | None
    p2p_port: int
    p2p_host: str
    p2p_bootstrap: tuple[str, ...]
    metrics_addr: tuple[str, int] | None
    metrics_max_repos: int
    shutdown_grace_secs: float
    db_retry_initial_secs: float
    db_retry_max_secs: float
    db_pool_size: int
    enforce_owner_push: bool
    max_pack_bytes: int
    git_service_timeout_secs: float
    git_max_reads: int
    git_max_writes: int
    signer_rate_limit: int
    create_rate_limit: int
    push_rate_limit: int
    sync_trigger_rate_limit: int
    peer_write_rate_limit: int
    access_log: bool
    trusted_proxy: bool
    bootstrap_peers: tuple[str, ...]
    require_signed_peer_writes: bool
    allow_private_peers: bool
    allow_private_webhooks: bool
    auto_sync: bool
    sync_max_attempts: int
    webhook_max_attempts: int
    webhook_max_age_secs: float
    webhook_connect_timeout_secs: float
    webhook_timeout_secs: float
    webhook_retry_base_secs: float
    webhook_retry_max_secs: float
    webhook_concurrency: int
    webhook_per_host_concurrency: int
    peer_timeout_secs: float
    sync_git_timeout_secs: float
    sync_concurrency: int
    contract_node_staking: str
    operator_private_key: str = field(repr=False)
    operator_strict_mode: bool
    heartbeat_interval_hours: float
    chain_rpc_url: str
    contract_did_registry: str
    contract_name_registry: str

    @classmethod
    def load(
        cls,
        environ: Mapping[str, str] | None = None,
        flags: Mapping[str, str | None] | None = None,
    ) -> Settings:
        """
        Read every setting: a flag given on the command line wins, then the
        environment, then the default.

        @param flags: flag values keyed by attribute name; C{None} means the
            flag was not given.
        @raise ConfigError: for the first setting whose value is not usable.
        """
        environ = os.environ if environ is None else environ
        flags = flags or {}
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            text = flags.get(setting.attribute)
            if text is None:
                text = environ.get(setting.env, setting.default)
            try:
                values[setting.attribute] = setting.parse(text)
            except (ValueError, TypeError):
                shown = "<hidden>" if setting.secret else text
                raise ConfigError(setting.env, shown, setting.accepts) from None
        settings = cls(**values)
        if settings.db_retry_max_secs < settings.db_retry_initial_secs:
            raise ConfigError(
                "GITLAWB_DB_RETRY_MAX_SECS",
                str(settings.db_retry_max_secs),
                "a number of seconds no smaller than GITLAWB_DB_RETRY_INITIAL_SECS",
            )
        if settings.webhook_retry_max_secs < settings.webhook_retry_base_secs:
            raise ConfigError(
                "GITLAWB_WEBHOOK_RETRY_MAX_SECS",
                str(settings.webhook_retry_max_secs),
                "a number of seconds no smaller than GITLAWB_WEBHOOK_RETRY_BASE_SECS",
            )
        return settings

    @property
    def repositories_path(self) -> Path:
        return self.repos_dir or self.data_dir / "repos"

    @property
    def key_path(self) -> Path:
        return self.key or self.data_dir / "identity.pem"

    @property
    def embedded_database_path(self) -> Path:
        return self.data_dir / "postgres"

    def public_base_url(self, bound_port: int | None = None) -> str:
        """
        The URL this node is reached at: C{GITLAWB_PUBLIC_URL}, or one made of
        the listening address and port (the bound one when the port was 0).
        """
        if self.public_url:
            return self.public_url
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{bound_port or self.port}"

"""Tests for gitlawb.config: reading, checking and explaining the settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from gitlawb.config import SETTINGS, ConfigError, Settings


def refused(environ: dict[str, str], flags: dict[str, str | None] | None = None) -> str:
    """Load settings that must be refused and return the error's one line."""
    with pytest.raises(ConfigError) as caught:
        Settings.load(environ=environ, flags=flags)
    return str(caught.value)


# Defaults, and where a value comes from.


def test_defaults() -> None:
    """With nothing set, every setting has its documented default."""
    settings = Settings.load(environ={}, flags={})

    assert settings.data_dir == Path("gitlawb-data")
    assert settings.host == "127.0.0.1"
    assert settings.port == 7545
    assert settings.public_url is None
    assert settings.database_url is None
    assert settings.p2p_port == 7546
    assert settings.metrics_addr is None
    assert settings.shutdown_grace_secs == 30.0
    assert settings.db_retry_initial_secs == 5.0
    assert settings.db_retry_max_secs == 60.0
    assert settings.db_pool_size == 5
    assert settings.enforce_owner_push is False
    assert settings.auto_sync is True
    assert settings.bootstrap_peers == ()
    assert settings.max_pack_bytes == 2 * 1024**3


def test_default_paths_under_data_dir() -> None:
    """The repositories, the key and the embedded database live in the data dir."""
    settings = Settings.load(environ={"GITLAWB_DATA_DIR": "/srv/node"})

    assert settings.repositories_path == Path("/srv/node/repos")
    assert settings.key_path == Path("/srv/node/identity.pem")
    assert settings.embedded_database_path == Path("/srv/node/postgres")


def test_every_default_is_valid() -> None:
    """Each setting's default text passes its own parser."""
    for setting in SETTINGS:
        setting.parse(setting.default)


def test_environment_is_read() -> None:
    """A value in the environment replaces the default."""
    settings = Settings.load(environ={"GITLAWB_PORT": "8080", "GITLAWB_HOST": "::1"})

    assert settings.port == 8080
    assert settings.host == "::1"


def test_flag_wins_over_environment() -> None:
    """A flag given on the command line wins over the environment variable."""
    settings = Settings.load(environ={"GITLAWB_PORT": "8080"}, flags={"port": "9090"})

    assert settings.port == 9090


def test_absent_flag_leaves_environment() -> None:
    """A flag that was not given (None) leaves the environment's value."""
    settings = Settings.load(environ={"GITLAWB_PORT": "8080"}, flags={"port": None})

    assert settings.port == 8080


def test_bad_flag_is_refused_even_with_good_environment() -> None:
    """A bad flag is refused although the environment holds a good value."""
    line = refused({"GITLAWB_PORT": "8080"}, flags={"port": "abc"})

    assert line.startswith("GITLAWB_PORT='abc'")


def test_boolean_spellings() -> None:
    """Booleans accept true/false, 1/0, yes/no and on/off in any case."""
    for text, expected in [("TRUE", True), ("1", True), ("Yes", True), ("on", True)]:
        environ = {"GITLAWB_ENFORCE_OWNER_PUSH": text}
        assert Settings.load(environ=environ).enforce_owner_push is expected
    for text in ("false", "0", "NO", "off", ""):
        environ = {"GITLAWB_AUTO_SYNC": text}
        assert Settings.load(environ=environ).auto_sync is False


def test_metrics_address_parsed() -> None:
    """GITLAWB_METRICS_ADDR becomes a host and a port, IPv6 in brackets."""
    ipv4 = Settings.load(environ={"GITLAWB_METRICS_ADDR": "127.0.0.1:9091"})
    ipv6 = Settings.load(environ={"GITLAWB_METRICS_ADDR": "[::1]:9091"})

    assert ipv4.metrics_addr == ("127.0.0.1", 9091)
    assert ipv6.metrics_addr == ("::1", 9091)


def test_url_lists_parsed() -> None:
    """Peer URLs are split on commas, trimmed and lose a trailing slash."""
    settings = Settings.load(
        environ={"GITLAWB_BOOTSTRAP_PEERS": " http://a.example/ , https://b:8443"}
    )

    assert settings.bootstrap_peers == ("http://a.example", "https://b:8443")


def test_database_url_kept() -> None:
    """A PostgreSQL URL is kept as given, including a Unix socket host."""
    url = "postgresql://gitlawb:secret@db.example:5433/gitlawb?sslmode=require"
    socket_url = "postgresql:///gitlawb?host=/run/postgresql"

    assert Settings.load(environ={"DATABASE_URL": url}).database_url == url
    assert Settings.load(environ={"DATABASE_URL": socket_url}).database_url == (
        socket_url
    )


def test_public_base_url_from_bound_port() -> None:
    """Without GITLAWB_PUBLIC_URL the node's URL is made of host and bound port."""
    settings = Settings.load(environ={"GITLAWB_HOST": "0.0.0.0", "GITLAWB_PORT": "0"})

    assert settings.public_base_url(41234) == "http://127.0.0.1:41234"


# Values the node cannot use: one line naming the variable and what it accepts.


def test_port_not_a_number() -> None:
    """A port of 'abc' is refused, naming GITLAWB_PORT and the accepted range."""
    line = refused({"GITLAWB_PORT": "abc"})

    assert line == (
        "GITLAWB_PORT='abc' is not valid: a TCP/UDP port number from 0 to 65535"
    )


def test_port_out_of_range() -> None:
    """A port above 65535 is refused."""
    line = refused({"GITLAWB_P2P_PORT": "70000"})

    assert line.startswith("GITLAWB_P2P_PORT='70000'")
    assert "0 to 65535" in line


def test_negative_grace() -> None:
    """A negative shutdown grace is refused, saying it takes 0 seconds or more."""
    line = refused({"GITLAWB_SHUTDOWN_GRACE_SECS": "-1"})

    assert line == (
        "GITLAWB_SHUTDOWN_GRACE_SECS='-1' is not valid: a number of seconds, 0 or more"
    )


def test_grace_not_finite() -> None:
    """A grace of nan or inf is refused."""
    for text in ("nan", "inf"):
        line = refused({"GITLAWB_SHUTDOWN_GRACE_SECS": text})
        assert line.startswith("GITLAWB_SHUTDOWN_GRACE_SECS=")


def test_bad_boolean() -> None:
    """A boolean of 'maybe' is refused, listing the accepted spellings."""
    line = refused({"GITLAWB_ENFORCE_OWNER_PUSH": "maybe"})

    assert line.startswith("GITLAWB_ENFORCE_OWNER_PUSH='maybe'")
    assert "true or false" in line


def test_public_url_wrong_scheme() -> None:
    """A public URL that is not http(s) is refused."""
    line = refused({"GITLAWB_PUBLIC_URL": "ftp://node.example"})

    assert line.startswith("GITLAWB_PUBLIC_URL='ftp://node.example'")
    assert "http:// or https:// URL" in line


def test_public_url_without_host() -> None:
    """A public URL with no host is refused."""
    line = refused({"GITLAWB_PUBLIC_URL": "http://"})

    assert line.startswith("GITLAWB_PUBLIC_URL=")


def test_public_url_bad_port() -> None:
    """A public URL whose port is not a number is refused."""
    line = refused({"GITLAWB_PUBLIC_URL": "http://node.example:abc"})

    assert line.startswith("GITLAWB_PUBLIC_URL=")


def test_peer_url_list_with_bad_entry() -> None:
    """One bad entry in GITLAWB_BOOTSTRAP_PEERS refuses the whole list."""
    line = refused({"GITLAWB_BOOTSTRAP_PEERS": "http://a.example,ftp://b.example"})

    assert line.startswith("GITLAWB_BOOTSTRAP_PEERS=")
    assert "comma-separated list of http(s) URLs" in line


def test_bootstrap_multiaddr_without_slash() -> None:
    """A libp2p bootstrap address that is not a multiaddr is refused."""
    line = refused({"GITLAWB_P2P_BOOTSTRAP": "1.2.3.4:7546"})

    assert line.startswith("GITLAWB_P2P_BOOTSTRAP=")


def test_database_url_wrong_scheme() -> None:
    """A database URL that is not postgresql:// is refused, its value hidden."""
    line = refused({"DATABASE_URL": "mysql://root:secret@db/gitlawb"})

    assert line.startswith("DATABASE_URL='<hidden>' is not valid: a postgresql://")
    assert "secret" not in line


def test_database_url_bad_port() -> None:
    """A database URL whose port is not a number is refused at start-up."""
    line = refused({"DATABASE_URL": "postgresql://db.example:abc/gitlawb"})

    assert line.startswith("DATABASE_URL='<hidden>'")


def test_database_url_unknown_parameter() -> None:
    """A database URL with a parameter libpq does not know is refused."""
    line = refused({"DATABASE_URL": "postgresql://db.example/gitlawb?colour=blue"})

    assert line.startswith("DATABASE_URL='<hidden>'")


def test_empty_data_dir() -> None:
    """An empty (or blank) data directory is refused."""
    for text in ("", "   "):
        line = refused({"GITLAWB_DATA_DIR": text})
        assert line.startswith("GITLAWB_DATA_DIR=")
        assert "a filesystem path (not empty)" in line


def test_data_dir_of_unknown_user() -> None:
    """A data directory under the home of a user that does not exist is refused."""
    line = refused({"GITLAWB_DATA_DIR": "~no-such-user-gitlawb/data"})

    assert line.startswith("GITLAWB_DATA_DIR='~no-such-user-gitlawb/data'")


def test_key_path_of_unknown_user() -> None:
    """A key path under the home of a user that does not exist is refused."""
    line = refused({"GITLAWB_KEY": "~no-such-user-gitlawb/key.pem"})

    assert line.startswith("GITLAWB_KEY=")


def test_metrics_address_without_port() -> None:
    """A metrics address without a port is refused, with an example of one."""
    for text in ("127.0.0.1", "127.0.0.1:", "localhost"):
        line = refused({"GITLAWB_METRICS_ADDR": text})
        assert line == (
            f"GITLAWB_METRICS_ADDR={text!r} is not valid: "
            "host:port (e.g. 127.0.0.1:9091), or empty for off"
        )


def test_metrics_address_without_host() -> None:
    """A metrics address with a port but no host, or empty brackets, is refused."""
    for text in (":9091", "[]:9091"):
        line = refused({"GITLAWB_METRICS_ADDR": text})
        assert line.startswith("GITLAWB_METRICS_ADDR=")


def test_metrics_address_bad_ip() -> None:
    """A metrics address whose IP is not one is refused."""
    line = refused({"GITLAWB_METRICS_ADDR": "300.1.1.1:9091"})

    assert line.startswith("GITLAWB_METRICS_ADDR=")


def test_host_with_path() -> None:
    """A listen host that is a URL rather than an address is refused."""
    line = refused({"GITLAWB_HOST": "http://0.0.0.0"})

    assert line.startswith("GITLAWB_HOST=")
    assert "IP address or host name" in line


def test_zero_pool_size() -> None:
    """A database pool of 0 connections is refused."""
    line = refused({"GITLAWB_DB_POOL_SIZE": "0"})

    assert line.startswith("GITLAWB_DB_POOL_SIZE='0'")
    assert "1 or more" in line


def test_negative_rate_limit() -> None:
    """A negative rate limit is refused (0 turns it off)."""
    line = refused({"GITLAWB_PUSH_RATE_LIMIT": "-5"})

    assert line.startswith("GITLAWB_PUSH_RATE_LIMIT='-5'")


def test_retry_max_below_initial() -> None:
    """A longest retry wait shorter than the first one is refused."""
    line = refused(
        {"GITLAWB_DB_RETRY_INITIAL_SECS": "10", "GITLAWB_DB_RETRY_MAX_SECS": "2"}
    )

    assert line.startswith("GITLAWB_DB_RETRY_MAX_SECS=")
    assert "GITLAWB_DB_RETRY_INITIAL_SECS" in line


def test_secret_hidden_in_error() -> None:
    """A refused secret setting does not appear in the error's attributes."""
    with pytest.raises(ConfigError) as caught:
        Settings.load(environ={"DATABASE_URL": "mysql://root:hunter2@db/x"})

    assert caught.value.name == "DATABASE_URL"
    assert caught.value.value == "<hidden>"


def test_operator_key_not_in_repr() -> None:
    """The operator's private key is left out of the settings' repr."""
    settings = Settings.load(environ={"GITLAWB_OPERATOR_PRIVATE_KEY": "0xdeadbeef"})

    assert "deadbeef" not in repr(settings)

"""
The node's service tree.

    GitlawbNode (MultiService)      children start in order, stop in reverse,
      DatabaseService               each waiting for the one after it
      ApiSite
      MetricsSite (when configured)
      RateLimitJanitor
      ...

The node's own C{stopService} is the graceful shutdown: it stops the children
one by one from the last to the first, so the database stops only when
nothing uses it any more, and logs one closing line with how long the stop
took and what was cut off.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gitlawb import __version__, metrics
from gitlawb.api.app import MAX_JSON_BODY, NodeContext, RateLimits, build_app
from gitlawb.chain_info import operator_heartbeat_enabled
from gitlawb.config import ConfigError, Settings
from gitlawb.db.embedded import EmbeddedPostgres
from gitlawb.db.service import DatabaseService
from gitlawb.git.smart_http import GitService
from gitlawb.git.store import RepositoryStore
from gitlawb.heartbeat import HeartbeatService
from gitlawb.identity.keys import NodeKey, load_or_create_key
from gitlawb.identity.signatures import ReplayGuard
from gitlawb.metrics_site import MetricsPoller, MetricsSite
from gitlawb.peers import OutboxRelay, PeerClient, SqlRelayStore
from gitlawb.ratelimit import RateLimitJanitor
from gitlawb.sync import Mirrorer, SqlSyncQueue, SyncWorker, ref_update_handler
from gitlawb.web import ApiSite, NodeSite, body_limit_for
from gitlawb.webhooks import WebhookDispatcher


class GitlawbNode(MultiService):
    """
    The root of the service tree.

    @ivar context: what the routes share.
    @ivar api: the public HTTP listener.
    """

    log = Logger()

    def __init__(self, settings: Settings, reactor: Any, key: NodeKey) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.key = key
        self.shutting_down = False
        self.fatal_error: str | None = None
        self._stop_started = 0.0
        self._deadline: float | None = None
        self.cut_off: dict[str, int] = {}

    def startService(self) -> None:
        self._log_startup()
        super().startService()
        if hasattr(self.reactor, "callWhenRunning"):
            self.reactor.callWhenRunning(self._install_signal_handlers)

    def _log_startup(self) -> None:
        s = self.settings
        database: DatabaseService = self.getServiceNamed("database")
        self.log.info("gitlawb node {version} starting", version=__version__)
        self.log.info("node DID: {did}", did=self.key.did)
        self.log.info("database: {db}", db=database.description)
        self.log.info("repositories: {path}", path=s.repositories_path.resolve())
        api: ApiSite = self.getServiceNamed("api")
        bound = api.bound_port if api.listening is not None else s.port
        self.log.info(
            "http: {host}:{port} (public URL {url})",
            host=s.host,
            port=bound,
            url=s.public_base_url(bound),
        )
        if s.metrics_addr:
            host, port = s.metrics_addr
            self.log.info("metrics: http://{host}:{port}/metrics", host=host, port=port)
        else:
            self.log.info("metrics: off")
        if s.p2p_port:
            self.log.info(
                "p2p: {host} port {port} (QUIC/UDP and TCP)",
                host=s.p2p_host,
                port=s.p2p_port,
            )
        else:
            self.log.info("p2p: off")
        if not operator_heartbeat_enabled(s):
            self.log.info("operator heartbeat: off")
        self.log.info("shutdown grace: {grace}s", grace=s.shutdown_grace_secs)

    def _install_signal_handlers(self) -> None:
        # twistd's own handlers stop the reactor; a second signal would make the
        # reactor complain that it is not running.  Ours say so politely.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self._signal_received, signum)

    def _signal_received(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.shutting_down:
            self.log.warn(
                "{signal} received: shutdown already under way (grace {grace}s)",
                signal=name,
                grace=self.settings.shutdown_grace_secs,
            )
            return
        self.log.info("{signal} received: shutting down", signal=name)
        # Set now, not when the stop begins: two signals handled in one turn
        # of the reactor would otherwise stop it twice (ReactorNotRunning).
        self.shutting_down = True
        # twistd re-raises the signal after the reactor stops, as it does with
        # its own handlers, so the exit status says what stopped the node.
        self.reactor._exitSignal = signum
        self.reactor.stop()

    def fatal(self, message: str) -> None:
        """
        Stop the node because it cannot work (a schema that does not match the
        code, a database that cannot start): log C{message}, stop, and exit
        with status 1.
        """
        self.log.critical("cannot run: {message}", message=message)
        self.fatal_error = message
        if not self.running or self.shutting_down:
            return

        def exit_failed() -> None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

        self.reactor.addSystemEventTrigger("after", "shutdown", exit_failed)
        self.reactor.stop()

    def grace_remaining(self) -> float:
        """
        Seconds left until the shutdown's grace deadline: the whole grace
        before the shutdown starts, then what remains of it.  Every child
        that drains work measures against this one deadline, so the stop as
        a whole is bounded by the grace, not by the grace times the children.
        """
        if self._deadline is None:
            return float(self.settings.shutdown_grace_secs)
        return max(0.0, self._deadline - float(self.reactor.seconds()))

    def stopService(self) -> Deferred[None]:
        """
        Stop every child, last started first, each after the one before it.

        @return: a Deferred that fires when the database (the first child) has
            stopped.
        """
        self.shutting_down = True
        self._stop_started = time.monotonic()
        self._deadline = self.reactor.seconds() + self.settings.shutdown_grace_secs
        metrics.set_shutdown_in_progress(True)
        self.log.info(
            "shutdown started (grace {grace}s)", grace=self.settings.shutdown_grace_secs
        )
        super(MultiService, self).stopService()

        # The public port refuses new connections from the first moment,
        # not only when its turn to stop comes: the services stopped before
        # it may take the whole grace.
        api = self.namedServices.get("api")
        if isinstance(api, ApiSite):
            api.stop_accepting()
        return Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        failed: list[str] = []
        for child in reversed(list(self)):
            service = IService(child)
            try:
                await Deferred.fromCoroutine(_maybe_await(service.stopService()))
            except Exception:
                self.log.failure("service {name} failed to stop", name=service.name)
                failed.append(str(service.name))
            cut = getattr(service, "cut_off", 0)
            if cut:
                self.cut_off[str(service.name)] = int(cut)
        elapsed = time.monotonic() - self._stop_started
        detail = ", ".join(f"{n}: {c}" for n, c in self.cut_off.items())
        if failed:
            self.log.error(
                "stopped in {elapsed:.2f}s; failed to stop: {failed};"
                " cut off at the grace deadline: {detail}",
                elapsed=elapsed,
                failed=", ".join(failed),
                detail=detail or "nothing",
            )
        elif self.cut_off:
            self.log.warn(
                "stopped in {elapsed:.2f}s; cut off at the grace deadline: {detail}",
                elapsed=elapsed,
                detail=detail,
            )
        else:
            self.log.info(
                "stopped cleanly in {elapsed:.2f}s; nothing was cut off",
                elapsed=elapsed,
            )


async def _maybe_await(result: object) -> None:
    if isinstance(result, Deferred):
        await result


class StartupError(Exception):
    """
    The node cannot be built from its settings; the message is one line.
    """


def make_node(
    settings: Settings,
    reactor: Any,
    route_installers: list[Callable[..., None]] | None = None,
) -> GitlawbNode:
    """
    Build the service tree from C{settings}.

    Nothing is bound or started; the key is loaded (or created) and the
    directories made, so that any problem with them stops start-up here.

    @raise StartupError: when the key or a directory cannot be used.
    """
    from gitlawb.identity.keys import KeyFileError

    try:
        key = load_or_create_key(settings.key_path)
    except KeyFileError as e:
        raise StartupError(str(e)) from None
    try:
        settings.repositories_path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StartupError(
            f"GITLAWB_REPOS_DIR: cannot create {settings.repositories_path}: {e}"
        ) from None

    node = GitlawbNode(settings, reactor, key)
    metrics.initialise(__version__, key.did, settings.metrics_max_repos)

    # The database first: it stops last.
    embedded = (
        None
        if settings.database_url
        else EmbeddedPostgres(settings.embedded_database_path)
    )
    database = DatabaseService(
        reactor,
        settings.database_url,
        embedded,
        settings.db_pool_size,
        settings.db_retry_initial_secs,
        settings.db_retry_max_secs,
        on_fatal=node.fatal,
    )
    database.setServiceParent(node)

    # The public listener and the application behind it.
    replay = ReplayGuard(reactor)
    limits = RateLimits.from_settings(settings, reactor)
    api_holder: list[ApiSite] = []

    # Every response naming a repository builds its URL, and the bound port
    # is a system call away: it is read once per listening port.
    url_of_port: list[tuple[object, str]] = []

    def public_url() -> str:
        api = api_holder[0]
        if api.listening is None:
            return settings.public_base_url(settings.port)
        if not url_of_port or url_of_port[0][0] is not api.listening:
            url_of_port[:] = [(api.listening, settings.public_base_url(api.bound_port))]
        return url_of_port[0][1]

    context = NodeContext(
        settings=settings,
        key=key,
        database_service=database,
        reactor=reactor,
        replay=replay,
        limits=limits,
        public_url=public_url,
        services={"route_installers": _default_route_installers()
                  + list(route_installers or [])},
    )  # fmt: skip
    node.context = context  # type: ignore[attr-defined]

    # git: stops after the listener has drained, before the database.
    store = RepositoryStore(
        settings.repositories_path,
        reactor,
        command_timeout=min(60.0, settings.git_service_timeout_secs),
        fork_timeout=settings.git_service_timeout_secs,
    )
    context.services["store"] = store
    git = GitService(context, store)
    context.services["git"] = git
    git.setServiceParent(node)

    # The metrics listener, when configured: it stops after the public
    # listener, so the drain can be watched.
    if settings.metrics_addr is not None:
        host, port = settings.metrics_addr
        MetricsSite(reactor, host, port).setServiceParent(node)

    app = build_app(context)
    site = NodeSite(
        app.resource(),
        body_limit=lambda path: body_limit_for(
            path, settings.max_pack_bytes, MAX_JSON_BODY
        ),
    )
    site.displayTracebacks = False
    site.access_log = settings.access_log
    api = ApiSite(
        reactor,
        site,
        settings.host,
        settings.port,
        node.grace_remaining,
    )
    api_holder.append(api)
    api.setServiceParent(node)

    # Peers: the signed, bounded client every outbound call goes through.
    client = PeerClient(
        reactor,
        key,
        timeout=settings.peer_timeout_secs,
        allow_private=settings.allow_private_peers,
    )
    context.services["peer_client"] = client

    # The libp2p swarm and the gossip of ref updates (GITLAWB_P2P_PORT=0: none).
    gossip: Any = None

    def peer_count() -> int:
        return swarm.connected_peer_count() if gossip is not None else 0

    if settings.p2p_port:
        # libp2p (and trio) are imported only when the swarm runs.
        from gitlawb.p2p.gossip import GossipService
        from gitlawb.p2p.swarm import SwarmService

        swarm = SwarmService(
            reactor,
            key,
            settings.p2p_port,
            settings.p2p_host,
            settings.p2p_bootstrap,
            on_fatal=node.fatal,
        )
        gossip = GossipService(
            swarm,
            ref_update_handler(
                database, auto_sync=settings.auto_sync, local_did=key.did
            ),
        )
        swarm.setServiceParent(node)
        gossip.setServiceParent(node)
        context.p2p_info = swarm.info
        context.services.update(swarm=swarm, gossip=gossip)

    # The outbox relay tells peers of each push (HTTP notify, and gossip when
    # the swarm runs); the sync worker mirrors what peers announce.
    relay = OutboxRelay(
        reactor,
        SqlRelayStore(database, key.did),
        client,
        gossip_publish=gossip.publish if gossip is not None else None,
        grace=node.grace_remaining,
    )
    context.services["outbox_relay"] = relay
    relay.setServiceParent(node)
    if settings.auto_sync:
        worker = SyncWorker(
            reactor,
            SqlSyncQueue(database, reactor),
            Mirrorer(
                reactor,
                store,
                timeout=settings.sync_git_timeout_secs,
                allow_private=settings.allow_private_peers,
                resolve=client.resolve,
            ),
            client,
            public_url=public_url,
            max_attempts=settings.sync_max_attempts,
            grace=node.grace_remaining,
            concurrency=settings.sync_concurrency,
            lease=3 * settings.sync_git_timeout_secs + 120,
        )
        context.services["sync"] = worker
        worker.setServiceParent(node)

    # Webhook deliveries, sent from the rows each push writes.
    webhooks = WebhookDispatcher.from_settings(
        settings, reactor, database, grace=node.grace_remaining
    )
    context.services["webhooks"] = webhooks
    webhooks.setServiceParent(node)

    # Liveness: announce to bootstrap peers, ping known ones; the operator's
    # on-chain heartbeat when it is configured.
    async def own_repo_count() -> int:
        rows = await database.database.query(
            "SELECT count(*) FROM repos WHERE origin_did IS NULL"
        )
        return int(rows[0][0])

    HeartbeatService(
        reactor,
        database,
        client,
        public_url=public_url,
        bootstrap_peers=settings.bootstrap_peers,
        repo_count=own_repo_count,
    ).setServiceParent(node)
    if operator_heartbeat_enabled(settings):
        # web3 is imported only when the heartbeat is configured.
        from gitlawb.chain import OperatorHeartbeat

        try:
            operator = OperatorHeartbeat(
                reactor, settings, key.did, on_fatal=node.fatal
            )
        except ConfigError as e:
            raise StartupError(str(e)) from None
        context.services["operator_heartbeat"] = operator
        operator.setServiceParent(node)

    # Housekeeping.
    RateLimitJanitor([*limits.all(), replay], reactor).setServiceParent(node)
    MetricsPoller(reactor, database, peer_count=peer_count).setServiceParent(node)
    return node


def _default_route_installers() -> list[Callable[..., None]]:
    """
    The route areas beyond the meta routes, in the order they are installed;
    git smart HTTP last, so that its C{/<owner>/<repo>/...} patterns never
    shadow the API's.
    """
    from gitlawb.api import agents, certs, contracts, hooks, peers, repos
    from gitlawb.git import smart_http

    return [
        agents.install,
        repos.install,
        certs.install,
        hooks.install,
        peers.install,
        contracts.install,
        smart_http.install,
    ]

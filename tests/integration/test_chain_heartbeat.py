"""
The operator heartbeat on the real reactor: its blocking web3 calls run in
the reactor's thread pool and reach the in-process test chain over HTTP, as
JSON-RPC on loopback, through the node's own web3 client (L{http_web3}).

The JSON-RPC endpoint is a small twisted.web resource in front of eth-tester;
the stand-in staking contract is the hand-assembled one of the unit tests.
"""

from __future__ import annotations

import json
from typing import Any, cast

# eth-tester ships no type information.
from eth_tester.exceptions import TransactionFailed  # type: ignore[import-untyped]
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from web3 import EthereumTesterProvider, Web3

from gitlawb import metrics
from gitlawb.chain import OperatorHeartbeat
from gitlawb.config import Settings
from tests.unit.test_chain import HEARTBEAT_SELECTOR, NODE_DID, TestChain


class JsonRpcResource(Resource):
    """
    JSON-RPC over HTTP in front of the test chain.  The first C{failures}
    requests for C{failing_method} are answered 503, as a flaky gateway does.
    """

    isLeaf = True

    def __init__(self, chain: TestChain) -> None:
        super().__init__()
        # The provider's own middleware turns wire values (hex quantities,
        # checksummed addresses) into eth-tester's and back; nothing else.
        web3 = Web3(EthereumTesterProvider(chain.tester), middleware=[])
        self.call = web3.provider.request_func(web3, web3.middleware_onion)
        self.failures = 0
        self.failing_method: str | None = None
        self.methods: list[str] = []

    def render_POST(self, request: Any) -> bytes:
        call = json.loads(request.content.read())
        self.methods.append(call["method"])
        request.setHeader(b"content-type", b"application/json")
        # No keep-alive: the test ends with no connection left open.
        request.setHeader(b"connection", b"close")
        if self.failures and call["method"] == self.failing_method:
            self.failures -= 1
            request.setResponseCode(503)
            return b'{"error": "unavailable"}'
        try:
            answer = dict(self.call(call["method"], call["params"]))
        except TransactionFailed:
            error = {"code": 3, "message": "execution reverted", "data": "0x"}
            answer = {"jsonrpc": "2.0", "error": error}
        answer["id"] = call["id"]
        return json.dumps(answer, default=_hex).encode()


def _hex(value: Any) -> Any:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    raise TypeError(type(value))


class OperatorHeartbeatOverHttpTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        metrics.reset()
        self.registry = metrics.initialise("test", NODE_DID).registry
        self.addCleanup(metrics.reset)
        self.chain = TestChain()
        self.rpc = JsonRpcResource(self.chain)
        site = Site(self.rpc)
        site.noisy = False
        # twisted.web.server.Site is not annotated as the factory it is.
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(self.port.stopListening)

    def service(self, **environ: str) -> OperatorHeartbeat:
        contract = self.chain.deploy_staking()
        port = cast(IPv4Address, self.port.getHost()).port
        settings = Settings.load(
            {
                "GITLAWB_CONTRACT_NODE_STAKING": contract,
                "GITLAWB_OPERATOR_PRIVATE_KEY": "0x" + self.chain.operator.key.hex(),
                "GITLAWB_CHAIN_RPC_URL": f"http://127.0.0.1:{port}/rpc",
                **environ,
            }
        )
        service = OperatorHeartbeat(
            reactor,
            settings,
            NODE_DID,
            first_delay=0.0,
            retry_initial=0.05,
            receipt_poll=0.05,
        )
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def count(self, result: str) -> float:
        value = self.registry.get_sample_value(
            "gitlawb_operator_heartbeats_total", {"result": result}
        )
        return float(value or 0.0)

    async def until(self, condition: Any, seconds: float = 20.0) -> None:
        for _ in range(int(seconds / 0.02)):
            if condition():
                return
            await deferLater(reactor, 0.02, lambda: None)
        self.fail("condition not reached in time")

    def test_heartbeat_reaches_the_contract_over_http(self) -> Deferred[None]:
        """
        Through the node's HTTP web3 client and the reactor's threads, one
        heartbeat is mined: to the contract, heartbeat(keccak(did)), from the
        operator.
        """

        async def run() -> None:
            service = self.service()

            service.startService()
            await self.until(lambda: self.count("ok") == 1)

            [tx] = self.chain.transactions_from(self.chain.operator.address)
            assert tx["to"] == service.contract.address
            assert bytes(tx["input"]) == HEARTBEAT_SELECTOR + service.node_hash
            await service.stopService()

        return Deferred.fromCoroutine(run())

    def test_rpc_failing_twice_then_working(self) -> Deferred[None]:
        """Two 503s on the send, then one heartbeat through, and only one."""

        async def run() -> None:
            self.rpc.failing_method = "eth_sendRawTransaction"
            self.rpc.failures = 2
            service = self.service()

            service.startService()
            await self.until(lambda: self.count("ok") == 1)

            assert self.count("rpc_error") == 2
            assert self.rpc.methods.count("eth_sendRawTransaction") == 3
            assert len(self.chain.transactions_from(self.chain.operator.address)) == 1
            await service.stopService()

        return Deferred.fromCoroutine(run())

    def test_shutdown_during_a_pending_heartbeat_is_clean(self) -> Deferred[None]:
        """
        Stopping while the receipt is awaited fires by the grace deadline, and
        leaves no worker thread busy.
        """

        async def run() -> None:
            service = self.service(GITLAWB_SHUTDOWN_GRACE_SECS="0.5")
            self.chain.pause_mining()
            service.startService()
            await self.until(lambda: "eth_getTransactionReceipt" in self.rpc.methods)

            started = reactor.seconds()
            await service.stopService()
            took = reactor.seconds() - started

            assert 0.4 <= took < 5, took
            assert self.count("abandoned") == 1
            assert service.cut_off == 1
            pool = reactor.getThreadPool()  # type: ignore[attr-defined]
            await self.until(lambda: not pool.working)

        return Deferred.fromCoroutine(run())

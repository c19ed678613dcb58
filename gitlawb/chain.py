"""
The operator heartbeat: this node's duty on the node-staking contract.

Operators of the live network stake on the C{GitlawbNodeStaking} contract on
Base and earn rewards while their node keeps a heartbeat there.  When both
C{GITLAWB_CONTRACT_NODE_STAKING} and C{GITLAWB_OPERATOR_PRIVATE_KEY} are set,
L{OperatorHeartbeat}:

  1. at start, reads the node's registration with C{getNodeInfo(bytes32)},
     the argument being keccak256 of the node's DID in UTF-8; in strict mode
     an unregistered or inactive node, or an RPC error, stops start-up;
  2. soon after, and then every C{GITLAWB_HEARTBEAT_INTERVAL_HOURS}, sends
     C{heartbeat(bytes32)} signed with the operator key and waits for its
     receipt, retrying a failure with backoff until the next one is due.

web3.py does the chain work.  Its calls block, so each runs in the reactor's
thread pool; every wait between them is a timer on the injected clock.  The
private key is read once into an account object and never appears in a log
line or an error.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from hexbytes import HexBytes
from prometheus_client import Counter, Gauge
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from web3 import HTTPProvider, Web3
from web3.exceptions import ContractLogicError, TransactionNotFound

from gitlawb import metrics
from gitlawb.chain_info import (
    effective_rpc_url,
    public_rpc_url,
)
from gitlawb.config import ConfigError, Settings

T = TypeVar("T")

#: Bound on each JSON-RPC request.
RPC_TIMEOUT_SECS: Final = 30.0

#: The first heartbeat goes this long after the registration check, so the
#: rest of the node has started; the reference waits a whole interval.
FIRST_HEARTBEAT_DELAY_SECS: Final = 5.0

#: The two functions of the staking contract this node calls.
STAKING_ABI: Final[list[dict[str, Any]]] = [
    {
        "type": "function",
        "name": "heartbeat",
        "stateMutability": "nonpayable",
        "inputs": [{"name": "nodeDidHash", "type": "bytes32"}],
        "outputs": [],
    },
    {
        "type": "function",
        "name": "getNodeInfo",
        "stateMutability": "view",
        "inputs": [{"name": "nodeDidHash", "type": "bytes32"}],
        "outputs": [
            {"name": "operator", "type": "address"},
            {"name": "httpUrl", "type": "string"},
            {"name": "stake", "type": "uint256"},
            {"name": "lastHeartbeat", "type": "uint256"},
            {"name": "registeredAt", "type": "uint256"},
            {"name": "active", "type": "bool"},
            {"name": "currentlyActive", "type": "bool"},
            {"name": "pendingRewards", "type": "uint256"},
            {"name": "unstakeRequestAt", "type": "uint256"},
        ],
    },
]

#: Values of the C{result} label of C{gitlawb_operator_heartbeats_total}.
HEARTBEAT_RESULTS: Final = ("ok", "reverted", "rpc_error", "abandoned")


# -- Settings ------------------------------------------------------------------


def did_hash(did: str) -> bytes:
    """
    The contract's key for a node: keccak256 of the DID's UTF-8 bytes.
    """
    return bytes(Web3.keccak(text=did))


def format_tokens(amount: int) -> str:
    """
    A token amount with 18 decimals as whole tokens, with two decimals when
    it has a fraction (10500000000000000000 -> "10.50").
    """
    whole, fraction = divmod(amount, 10**18)
    if not fraction:
        return str(whole)
    return f"{whole}.{fraction * 100 // 10**18:02d}"


# -- The chain calls (blocking) ------------------------------------------------


class HeartbeatReverted(Exception):
    """
    The contract refused the heartbeat: the gas estimate reverted, or the
    transaction was mined with status 0.
    """


@dataclass(frozen=True)
class NodeRegistration:
    """
    What C{getNodeInfo(bytes32)} returns for a node.
    """

    operator: str
    http_url: str
    stake: int
    last_heartbeat: int
    registered_at: int
    active: bool
    currently_active: bool
    pending_rewards: int
    unstake_request_at: int

    @property
    def registered(self) -> bool:
        return int(self.operator, 16) != 0

    @classmethod
    def from_values(cls, values: Any) -> NodeRegistration:
        (operator, http_url, stake, last, registered_at, active, current,
         rewards, unstake) = values  # fmt: skip
        return cls(
            operator=str(operator),
            http_url=str(http_url),
            stake=int(stake),
            last_heartbeat=int(last),
            registered_at=int(registered_at),
            active=bool(active),
            currently_active=bool(current),
            pending_rewards=int(rewards),
            unstake_request_at=int(unstake),
        )


@dataclass(frozen=True)
class HeartbeatReceipt:
    tx_hash: str
    block: int
    status: int
    gas_used: int


class StakingContract:
    """
    The staking contract as this node uses it, through web3.py.

    Every method blocks on the RPC: call it from a thread.
    """

    def __init__(
        self, web3: Web3, address: ChecksumAddress, operator: LocalAccount
    ) -> None:
        self.web3 = web3
        self.address = address
        self._contract = web3.eth.contract(address=address, abi=STAKING_ABI)
        self._operator = operator

    def chain_id(self) -> int:
        return int(self.web3.eth.chain_id)

    def node_info(self, node_hash: bytes) -> NodeRegistration:
        values = self._contract.functions.getNodeInfo(node_hash).call()
        return NodeRegistration.from_values(values)

    def send_heartbeat(self, node_hash: bytes) -> str:
        """
        Sign C{heartbeat(node_hash)} with the operator key and send it.

        @return: the transaction hash, 0x-prefixed hex.
        @raise HeartbeatReverted: when the gas estimate says it would revert.
        """
        sender = self._operator.address
        nonce = self.web3.eth.get_transaction_count(sender, "pending")
        try:
            transaction = self._contract.functions.heartbeat(
                node_hash
            ).build_transaction({"from": sender, "nonce": nonce})
        except ContractLogicError as e:
            raise HeartbeatReverted(
                f"the contract refuses the heartbeat: {e.message or e}"
            ) from None
        # web3's TxParams (a TypedDict) and eth-account's parameter type (a plain
        # dict of the same values) describe one dictionary two ways.
        signed = self._operator.sign_transaction(transaction)  # type: ignore[arg-type]
        return self.web3.eth.send_raw_transaction(signed.raw_transaction).to_0x_hex()

    def receipt(self, tx_hash: str) -> HeartbeatReceipt | None:
        """
        @return: the receipt of a mined transaction, or C{None} while pending.
        """
        try:
            found = self.web3.eth.get_transaction_receipt(HexBytes(tx_hash))
        except TransactionNotFound:
            return None
        return HeartbeatReceipt(
            tx_hash=tx_hash,
            block=int(found["blockNumber"]),
            status=int(found["status"]),
            gas_used=int(found["gasUsed"]),
        )


def http_web3(rpc_url: str) -> Web3:
    """
    A web3 client for a JSON-RPC endpoint over HTTP, each request bounded by
    L{RPC_TIMEOUT_SECS}.

    web3's own retries are off: they would sleep in the worker thread where
    shutdown cannot cut them short, and hide failures from the log and the
    metrics.  L{OperatorHeartbeat} retries on its clock instead.
    """
    provider = HTTPProvider(
        rpc_url,
        request_kwargs={"timeout": RPC_TIMEOUT_SECS},
        exception_retry_configuration=None,
    )
    return Web3(provider)


# -- Metrics -------------------------------------------------------------------


class _HeartbeatFamilies:
    """
    The heartbeat's metric families in one registry, made the first time
    something is recorded there.
    """

    def __init__(self, registry: Any) -> None:
        self.sent = Counter(
            "gitlawb_operator_heartbeats",
            "Operator heartbeat attempts on the staking contract, by result.",
            ["result"],
            registry=registry,
        )
        for result in HEARTBEAT_RESULTS:
            self.sent.labels(result=result)
        self.age = Gauge(
            "gitlawb_operator_heartbeat_age_seconds",
            "Seconds since the last operator heartbeat was mined (counted from "
            "start-up until the first one is).",
            registry=registry,
        )
        self.age.set_function(self.seconds_since_success)
        self.clock: IReactorTime | None = None
        self.since: float | None = None

    def seconds_since_success(self) -> float:
        if self.clock is None or self.since is None:
            return math.nan
        return max(0.0, self.clock.seconds() - self.since)


_by_registry: weakref.WeakKeyDictionary[Any, _HeartbeatFamilies] = (
    weakref.WeakKeyDictionary()
)


def _families() -> _HeartbeatFamilies | None:
    node = metrics.families()
    if node is None:
        return None
    found = _by_registry.get(node.registry)
    if found is None:
        found = _by_registry[node.registry] = _HeartbeatFamilies(node.registry)
    return found


def record_heartbeat(result: str) -> None:
    """
    Count one heartbeat attempt with C{result}, one of L{HEARTBEAT_RESULTS}.
    """
    families = _families()
    if families is not None:
        families.sent.labels(result=result).inc()


def reset_heartbeat_age(clock: IReactorTime) -> None:
    """
    Count the age gauge from now on C{clock}: when a heartbeat is mined, and
    at start-up, so that a node that never gets one through shows a growing
    age rather than none.
    """
    families = _families()
    if families is not None:
        families.clock = clock
        families.since = clock.seconds()


# -- The service ---------------------------------------------------------------


class OperatorHeartbeat(Service):
    """
    Checks this node's registration on the staking contract at start and
    keeps its heartbeat there.

    C{startService} returns at once: the check and the heartbeats run in the
    background.  The check also runs by itself through
    L{check_registration}, which the node may await before it serves.

    @ivar chain_id: the chain the RPC serves, once the check has read it.
    @ivar registration: what the check read, when it could.
    @ivar cut_off: 1 when a heartbeat in flight was abandoned at shutdown.
    """

    name = "operator-heartbeat"
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        settings: Settings,
        node_did: str,
        clock: IReactorTime | None = None,
        web3_factory: Callable[[str], Web3] = http_web3,
        on_fatal: Callable[[str], None] | None = None,
        *,
        first_delay: float = FIRST_HEARTBEAT_DELAY_SECS,
        retry_initial: float = 60.0,
        retry_max: float = 3600.0,
        receipt_poll: float = 2.0,
        receipt_timeout: float = 180.0,
    ) -> None:
        """
        @param reactor: runs the blocking chain calls in its thread pool.
        @param clock: every timer; the reactor when not given.
        @param web3_factory: makes the web3 client from the RPC URL.
        @param on_fatal: called with a one-line message when strict mode
            refuses to let the node run (the node's C{fatal}).
        @raise ConfigError: when the contract address or the operator key is
            not usable (the key never appears in the message).
        """
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._settings = settings
        self._node_did = node_did
        self._on_fatal = on_fatal
        self._first_delay = first_delay
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._receipt_poll = receipt_poll
        self._receipt_timeout = receipt_timeout
        self._interval = settings.heartbeat_interval_hours * 3600.0
        self._rpc_url = effective_rpc_url(settings)
        self.node_hash = did_hash(node_did)

        # Neither message may carry the key: the account is made outside the
        # except block so no exception about the key text survives as context.
        address = settings.contract_node_staking.strip()
        if not Web3.is_address(address):
            raise ConfigError(
                "GITLAWB_CONTRACT_NODE_STAKING",
                address,
                "a 0x-prefixed 20-byte hex address (checksummed when mixed-case)",
            )
        operator: LocalAccount | None
        try:
            operator = Account.from_key(settings.operator_private_key.strip())
        except Exception:
            operator = None
        if operator is None:
            raise ConfigError(
                "GITLAWB_OPERATOR_PRIVATE_KEY",
                "<hidden>",
                "a 32-byte private key in hex (0x-prefixed or not)",
            )
        self.operator_address: str = operator.address
        self.contract = StakingContract(
            web3_factory(self._rpc_url), Web3.to_checksum_address(address), operator
        )
        self._secrets = _secret_forms(settings.operator_private_key, self._rpc_url)

        self.chain_id: int | None = None
        self.registration: NodeRegistration | None = None
        self.cut_off = 0
        self._check: Deferred[NodeRegistration | None] | None = None
        self._loop: Deferred[None] | None = None
        self._in_flight = False
        self._pending_tx: str | None = None

    # -- Start and stop --------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.log.info(
            "operator heartbeat: contract {contract} via {rpc}, operator "
            "{operator}, every {hours}h, strict mode {strict}",
            contract=self.contract.address,
            rpc=public_rpc_url(self._rpc_url),
            operator=self.operator_address,
            hours=self._settings.heartbeat_interval_hours,
            strict="on" if self._settings.operator_strict_mode else "off",
        )
        reset_heartbeat_age(self._clock)
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(self._loop_ended)

    def _loop_ended(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            self.log.failure("operator heartbeat loop failed", failure)

    def stopService(self) -> Deferred[None]:
        """
        Stop the heartbeats.  One in flight (sent, receipt awaited) may finish
        until the shutdown grace deadline; then it is abandoned: the
        transaction may still be mined, but nothing waits for it.

        @return: a Deferred that fires once no heartbeat is in flight.
        """
        super().stopService()
        loop = self._loop
        if loop is None or loop.called:
            return succeed(None)
        if not self._in_flight:
            # Waiting for the next tick, a retry or the check: nothing to finish.
            loop.cancel()
            return succeed(None)
        return Deferred.fromCoroutine(self._finish_in_flight(loop))

    async def _finish_in_flight(self, loop: Deferred[None]) -> None:
        grace = self._settings.shutdown_grace_secs
        self.log.info(
            "waiting up to {grace}s for the operator heartbeat in flight",
            grace=grace,
        )
        deadline = self._clock.callLater(grace, loop.cancel)
        try:
            await loop
        finally:
            if deadline.active():
                deadline.cancel()

    # -- The registration check -------------------------------------------------

    def check_registration(self) -> Deferred[NodeRegistration | None]:
        """
        Read this node's registration and judge it.  In strict mode an
        unregistered or inactive node, or an RPC error, calls C{on_fatal};
        otherwise the problem is logged and the node runs.

        The check runs once; later calls fire with the same result.

        @return: a Deferred that fires with the registration, or C{None} when
            it could not be read.  It never fails.
        """
        if self._check is None:
            self._check = Deferred.fromCoroutine(self._check_registration())
        waiter: Deferred[NodeRegistration | None] = Deferred()

        def relay(result: NodeRegistration | None) -> NodeRegistration | None:
            waiter.callback(result)
            return result

        self._check.addCallback(relay)
        return waiter

    async def _check_registration(self) -> NodeRegistration | None:
        contract = self.contract.address
        try:
            self.chain_id = await self._blocking(self.contract.chain_id)
            registration = await self._blocking(self.contract.node_info, self.node_hash)
        except Exception as e:
            self._judge(
                f"cannot read this node's registration from the staking contract "
                f"{contract} via {public_rpc_url(self._rpc_url)}: {self._reason(e)}"
            )
            return None
        self.registration = registration

        if not registration.registered:
            self._judge(
                f"node {self._node_did} (DID hash 0x{self.node_hash.hex()}) is not "
                f"registered on the staking contract {contract} on chain "
                f"{self.chain_id}; register it with `gl node register`"
            )
            return registration
        self.log.info(
            "operator registration: operator {operator}, stake {stake} tokens, "
            "last heartbeat {last} (unix), active {active}, pending rewards "
            "{rewards} tokens, chain {chain}",
            operator=registration.operator,
            stake=format_tokens(registration.stake),
            last=registration.last_heartbeat,
            active=registration.currently_active,
            rewards=format_tokens(registration.pending_rewards),
            chain=self.chain_id,
        )
        if registration.operator.lower() != self.operator_address.lower():
            self.log.warn(
                "the operator key's address {mine} is not the node's registered "
                "operator {theirs}: the contract may refuse its heartbeats",
                mine=self.operator_address,
                theirs=registration.operator,
            )
        if not registration.currently_active:
            self._judge(
                f"node {self._node_did} is registered on the staking contract "
                f"{contract} but not currently active (last heartbeat "
                f"{registration.last_heartbeat}, unix); post one with "
                "`gl node heartbeat`"
            )
        return registration

    def _judge(self, problem: str) -> None:
        if self._settings.operator_strict_mode:
            message = f"{problem} (GITLAWB_OPERATOR_STRICT_MODE=true)"
            if self._on_fatal is not None:
                self._on_fatal(message)
            else:
                self.log.critical("{message}", message=message)
            return
        self.log.warn(
            "operator registration: {problem}; running anyway because "
            "GITLAWB_OPERATOR_STRICT_MODE is off",
            problem=problem,
        )

    # -- The heartbeats --------------------------------------------------------

    async def _run(self) -> None:
        await self.check_registration()
        if self._settings.operator_strict_mode and not self._usable_registration():
            return

        next_tick = self._clock.seconds() + self._first_delay
        while self.running:
            await self._sleep(max(0.0, next_tick - self._clock.seconds()))
            next_tick = self._clock.seconds() + self._interval
            await self._beat_until(next_tick)

    def _usable_registration(self) -> bool:
        registration = self.registration
        return (
            registration is not None
            and registration.registered
            and registration.currently_active
        )

    async def _beat_until(self, next_tick: float) -> None:
        """
        Get one heartbeat through, retrying with backoff while a retry still
        comes before C{next_tick}.
        """
        delay = self._retry_initial
        while True:
            try:
                self._in_flight = True
                receipt = await self._heartbeat()
            except CancelledError:
                self.cut_off = 1
                record_heartbeat("abandoned")
                self.log.warn(
                    "operator heartbeat abandoned at the shutdown grace deadline "
                    "(transaction {tx} may still be mined)",
                    tx=self._pending_tx or "not sent",
                )
                raise
            except HeartbeatReverted as e:
                record_heartbeat("reverted")
                reason = self._reason(e)
            except Exception as e:
                record_heartbeat("rpc_error")
                reason = self._reason(e)
            else:
                record_heartbeat("ok")
                reset_heartbeat_age(self._clock)
                self.log.info(
                    "operator heartbeat mined: tx {tx} in block {block}, gas {gas}",
                    tx=receipt.tx_hash,
                    block=receipt.block,
                    gas=receipt.gas_used,
                )
                return
            finally:
                self._in_flight = False
                self._pending_tx = None

            if not self.running:
                self.log.warn(
                    "operator heartbeat failed during shutdown: {reason}",
                    reason=reason,
                )
                return
            if self._clock.seconds() + delay >= next_tick:
                self.log.warn(
                    "operator heartbeat failed: {reason}; next attempt at the "
                    "next tick, in {wait:.0f}s",
                    reason=reason,
                    wait=next_tick - self._clock.seconds(),
                )
                return
            self.log.warn(
                "operator heartbeat failed: {reason}; retrying in {delay:.0f}s",
                reason=reason,
                delay=delay,
            )
            await self._sleep(delay)
            delay = min(delay * 2, self._retry_max)

    async def _heartbeat(self) -> HeartbeatReceipt:
        """
        Send one heartbeat and wait for its receipt.

        @raise HeartbeatReverted: when the contract refuses it.
        """
        tx_hash = await self._blocking(self.contract.send_heartbeat, self.node_hash)
        self._pending_tx = tx_hash
        self.log.info("operator heartbeat sent: tx {tx}", tx=tx_hash)

        give_up = self._clock.seconds() + self._receipt_timeout
        while True:
            receipt = await self._blocking(self.contract.receipt, tx_hash)
            if receipt is not None:
                break
            if self._clock.seconds() >= give_up:
                raise TimeoutError(
                    f"transaction {tx_hash} not mined within "
                    f"{self._receipt_timeout:.0f}s"
                )
            await self._sleep(self._receipt_poll)
        if receipt.status != 1:
            raise HeartbeatReverted(
                f"transaction {tx_hash} reverted in block {receipt.block}"
            )
        return receipt

    # -- Helpers ---------------------------------------------------------------

    def _blocking(self, call: Callable[..., T], *args: Any) -> Deferred[T]:
        pool = self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, call, *args)

    def _sleep(self, seconds: float) -> Deferred[None]:
        return deferLater(self._clock, seconds, lambda: None)

    def _reason(self, error: BaseException) -> str:
        """
        One line about a failure, with the key and the RPC URL's secret parts
        cut out (an HTTP error names the URL).
        """
        text = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        for secret in self._secrets:
            text = text.replace(secret, "<hidden>")
        return text


def _secret_forms(private_key: str, rpc_url: str) -> list[str]:
    """
    The texts that must not reach a log: the key as given and without its
    0x, and the RPC URL's path and query when they carry more than a slash.
    """
    key = private_key.strip()
    forms = {key, key.removeprefix("0x"), key.removeprefix("0X")}
    parts = urlsplit(rpc_url)
    if len(parts.path) > 1:
        forms.add(parts.path)
    if parts.query:
        forms.add(parts.query)
    if parts.username or parts.password:
        forms.add(parts.netloc.rpartition("@")[0])
    return sorted((f for f in forms if len(f) >= 4), key=len, reverse=True)

"""
The operator heartbeat against an in-process chain: eth-tester on py-evm,
driven through web3.py exactly as the node drives a real RPC, with every
timer on a L{Clock} and the "thread pool" running each blocking call at once.

The staking contract is a stand-in.  No Solidity compiler can run here, so
its bytecode is assembled by hand (see L{returning}): whatever it is called
with, it returns one fixed ABI-encoded C{getNodeInfo} tuple.  That is all
C{getNodeInfo} needs, and a C{heartbeat(bytes32)} transaction to it succeeds
and is mined, so the tests read the mined transaction back from the chain to
see where it went, what it carried and who signed it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from eth_abi.abi import encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak

# eth-tester ships no type information.
from eth_tester import EthereumTester, PyEVMBackend  # type: ignore[import-untyped]
from eth_tester.exceptions import TransactionFailed  # type: ignore[import-untyped]
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from web3 import EthereumTesterProvider, Web3
from web3.types import Wei

from gitlawb import metrics
from gitlawb.chain import (
    FIRST_HEARTBEAT_DELAY_SECS,
    OperatorHeartbeat,
    did_hash,
    format_tokens,
    public_rpc_url,
)
from gitlawb.config import ConfigError, Settings

NODE_DID = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"
GETNODEINFO_TYPES = [
    "address",
    "string",
    "uint256",
    "uint256",
    "uint256",
    "bool",
    "bool",
    "uint256",
    "uint256",
]
TOKENS = 10**18


# -- The test chain ------------------------------------------------------------


def returning(data: bytes) -> bytes:
    """
    EVM code that returns C{data}, which it carries after itself::

        PUSH2 len(data)  DUP1  PUSH1 12  PUSH1 0  CODECOPY  PUSH1 0  RETURN

    CODECOPY puts the C{len(data)} bytes found at offset 12 of the running
    code (just past these 12 bytes of instructions) at memory 0, and RETURN
    returns them.  Used twice, it makes a whole contract: the creation code
    C{returning(runtime)} returns the runtime code C{returning(answer)},
    which answers every call with C{answer}.
    """
    assert len(data) < 0x10000
    header = bytes([0x61, len(data) >> 8, len(data) & 0xFF, 0x80])
    header += bytes([0x60, 12, 0x60, 0x00, 0x39, 0x60, 0x00, 0xF3])
    return header + data


class TestChain:
    """
    An in-process chain with a funded operator account.
    """

    __test__ = False

    def __init__(self) -> None:
        self.tester = EthereumTester(PyEVMBackend())
        self.web3 = Web3(EthereumTesterProvider(self.tester))
        self.funder = self.web3.eth.accounts[0]
        self.operator: LocalAccount = Account.create()
        self.web3.eth.send_transaction(
            {"from": self.funder, "to": self.operator.address, "value": Wei(TOKENS)}
        )

    def deploy_staking(
        self,
        registered: bool = True,
        currently_active: bool = True,
        operator: str | None = None,
    ) -> str:
        """
        Deploy a stand-in staking contract whose C{getNodeInfo} answers with
        a registration as described; return its address.
        """
        if operator is None:
            operator = self.operator.address if registered else "0x" + "00" * 20
        answer = encode(
            GETNODEINFO_TYPES,
            [
                operator,
                "https://node.example" if registered else "",
                10_000 * TOKENS if registered else 0,
                1_700_000_000 if registered else 0,
                1_690_000_000 if registered else 0,
                registered,
                registered and currently_active,
                25 * TOKENS // 10,
                0,
            ],
        )
        tx = self.web3.eth.send_transaction(
            {"from": self.funder, "data": returning(returning(answer))}
        )
        address = self.web3.eth.get_transaction_receipt(tx)["contractAddress"]
        assert address is not None
        return str(address)

    def transactions_from(self, sender: str) -> list[Any]:
        """
        Every mined transaction sent by C{sender}, oldest first.
        """
        found = []
        for number in range(self.web3.eth.block_number + 1):
            for tx_hash in self.web3.eth.get_block(number)["transactions"]:
                tx = self.web3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
                if tx["from"] == sender:
                    found.append(tx)
        return found

    def pause_mining(self) -> None:
        self.tester.disable_auto_mine_transactions()

    def mine(self) -> None:
        self.tester.mine_blocks(1)


class FlakyProvider(EthereumTesterProvider):
    """
    The test chain behind an RPC whose first C{failures} requests for
    C{method} (every method when C{None}) fail like a refused connection.

    A revert comes back as a JSON-RPC node reports it (error code 3,
    "execution reverted"), not as eth-tester's own exception.
    """

    def __init__(
        self, tester: EthereumTester, failures: int = 0, method: str | None = None
    ):
        super().__init__(tester)
        self.failures = failures
        self.method = method
        self.failed = 0

    def make_request(self, method: Any, params: Any) -> Any:
        if self.failures and self.method in (None, method):
            self.failures -= 1
            self.failed += 1
            raise ConnectionError("connection refused (test RPC)")
        try:
            return super().make_request(method, params)
        except TransactionFailed:
            error = {"code": 3, "message": "execution reverted", "data": "0x"}
            return {"jsonrpc": "2.0", "id": 0, "error": error}


# -- A reactor without threads -------------------------------------------------


class ImmediatePool:
    """
    A thread pool that runs each call at once, in the caller's thread.
    """

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *a: Any
    ) -> None:
        try:
            result = f(*a)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class HeldPool:
    """
    A thread pool whose calls wait until the test runs them, standing for a
    worker thread that is still blocked on the RPC.
    """

    def __init__(self) -> None:
        self.held: list[
            tuple[Callable[[bool, Any], None], Callable[..., Any], Any]
        ] = []

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *a: Any
    ) -> None:
        self.held.append((on_result, f, a))

    def run_next(self) -> None:
        on_result, f, a = self.held.pop(0)
        ImmediatePool().callInThreadWithCallback(on_result, f, *a)


class ThreadlessReactor(Clock):
    """
    A L{Clock} that also has what C{deferToThreadPool} needs.
    """

    def __init__(self, pool: Any = None) -> None:
        super().__init__()
        self.pool = pool or ImmediatePool()

    def getThreadPool(self) -> Any:
        return self.pool

    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None:
        f(*a, **kw)


# -- Fixtures --------------------------------------------------------------------


@pytest.fixture
def chain() -> TestChain:
    return TestChain()


@pytest.fixture
def registry() -> Iterator[Any]:
    """
    The node's metric families, forgotten afterwards.
    """
    metrics.reset()
    families = metrics.initialise("test", NODE_DID)
    yield families.registry
    metrics.reset()


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """
    Every log line written during the test, formatted.
    """
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event) or "")
        failure = event.get("log_failure")
        if failure is not None:
            lines.append(failure.getTraceback())

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


def settings_for(
    contract: str, key: LocalAccount, strict: bool = False, **extra: str
) -> Settings:
    environ = {
        "GITLAWB_CONTRACT_NODE_STAKING": contract,
        "GITLAWB_OPERATOR_PRIVATE_KEY": "0x" + key.key.hex(),
        "GITLAWB_OPERATOR_STRICT_MODE": "true" if strict else "false",
        "GITLAWB_CHAIN_RPC_URL": "http://127.0.0.1:8545",
        "GITLAWB_SHUTDOWN_GRACE_SECS": "30",
        **extra,
    }
    return Settings.load(environ)


def heartbeat_for(
    chain: TestChain,
    contract: str,
    strict: bool = False,
    web3: Web3 | None = None,
    reactor: ThreadlessReactor | None = None,
    fatal: list[str] | None = None,
    **extra: str,
) -> tuple[OperatorHeartbeat, ThreadlessReactor]:
    reactor = reactor or ThreadlessReactor()
    settings = settings_for(contract, chain.operator, strict, **extra)
    service = OperatorHeartbeat(
        reactor,
        settings,
        NODE_DID,
        clock=reactor,
        web3_factory=lambda url: web3 or chain.web3,
        on_fatal=(fatal.append if fatal is not None else None),
    )
    return service, reactor


def count(registry: Any, result: str) -> float:
    value = registry.get_sample_value(
        "gitlawb_operator_heartbeats_total", {"result": result}
    )
    return float(value or 0.0)


HEARTBEAT_SELECTOR = keccak(b"heartbeat(bytes32)")[:4]


# -- The transaction -------------------------------------------------------------


def test_heartbeat_goes_to_the_contract_signed_by_the_operator(
    chain: TestChain,
) -> None:
    """
    The heartbeat is a transaction to the configured contract calling
    heartbeat(keccak256(did)), sent from (so signed by) the operator key.
    """
    contract = chain.deploy_staking()
    service, clock = heartbeat_for(chain, contract)

    service.startService()
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS)

    [tx] = chain.transactions_from(chain.operator.address)
    assert tx["to"] == contract
    assert bytes(tx["input"]) == HEARTBEAT_SELECTOR + keccak(NODE_DID.encode())
    assert HEARTBEAT_SELECTOR.hex() == "5a3b7899"
    receipt = chain.web3.eth.get_transaction_receipt(tx["hash"])
    assert receipt["status"] == 1
    service.stopService()


def test_transaction_signature_recovers_to_the_operator(chain: TestChain) -> None:
    """
    The signature on the mined transaction recovers to the operator's address.
    """
    contract = chain.deploy_staking()
    service, clock = heartbeat_for(chain, contract)
    service.startService()
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS)

    [tx] = chain.transactions_from(chain.operator.address)
    raw = chain.tester.get_transaction_by_hash(tx["hash"].to_0x_hex())
    signed = {
        "type": int(raw["type"], 16) if isinstance(raw["type"], str) else raw["type"],
        "chainId": raw["chain_id"],
        "nonce": raw["nonce"],
        "maxPriorityFeePerGas": raw["max_priority_fee_per_gas"],
        "maxFeePerGas": raw["max_fee_per_gas"],
        "gas": raw["gas"],
        "to": raw["to"],
        "value": raw["value"],
        "data": raw["data"],
        "accessList": raw["access_list"],
    }

    unsigned = Account.sign_transaction(signed, chain.operator.key)
    assert Account.recover_transaction(unsigned.raw_transaction) == (
        chain.operator.address
    )
    assert unsigned.hash == tx["hash"]
    service.stopService()


def test_did_hash_is_keccak_of_the_utf8_did() -> None:
    """The contract's key for a node is keccak256 of its DID's UTF-8 bytes."""
    assert did_hash("did:key:zé") == keccak("did:key:zé".encode())


def test_first_heartbeat_soon_after_start(chain: TestChain) -> None:
    """
    The first heartbeat goes a few seconds after start, not a whole interval
    later.
    """
    contract = chain.deploy_staking()
    service, clock = heartbeat_for(chain, contract)

    service.startService()
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS - 0.1)
    before = chain.transactions_from(chain.operator.address)
    clock.advance(0.1)

    assert before == []
    assert len(chain.transactions_from(chain.operator.address)) == 1
    service.stopService()


def test_heartbeats_repeat_every_interval(chain: TestChain) -> None:
    """After the first, one heartbeat goes every GITLAWB_HEARTBEAT_INTERVAL_HOURS."""
    contract = chain.deploy_staking()
    service, clock = heartbeat_for(
        chain, contract, GITLAWB_HEARTBEAT_INTERVAL_HOURS="2"
    )
    service.startService()
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS)

    clock.advance(2 * 3600 - 1)
    before = len(chain.transactions_from(chain.operator.address))
    clock.advance(1)

    assert before == 1
    assert len(chain.transactions_from(chain.operator.address)) == 2
    service.stopService()


# -- The registration check --------------------------------------------------------


def test_strict_mode_refuses_to_start_when_unregistered(chain: TestChain) -> None:
    """
    In strict mode an unregistered node calls on_fatal with a message naming
    the problem, and sends no heartbeat.
    """
    contract = chain.deploy_staking(registered=False)
    fatal: list[str] = []
    service, clock = heartbeat_for(chain, contract, strict=True, fatal=fatal)

    service.startService()
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS * 10)

    [message] = fatal
    assert "is not registered on the staking contract" in message
    assert contract in message
    assert "GITLAWB_OPERATOR_STRICT_MODE=true" in message
    assert chain.transactions_from(chain.operator.address) == []
    assert clock.getDelayedCalls() == []


def test_strict_mode_refuses_to_start_when_inactive(chain: TestChain) -> None:
    """In strict mode a registered node that is not currently active is fatal."""
    contract = chain.deploy_staking(currently_active=False)
    fatal: list[str] = []
    service, _ = heartbeat_for(chain, contract, strict=True, fatal=fatal)

    service.startService()

    [message] = fatal
    assert "not currently active" in message


def test_strict_mode_refuses_to_start_on_rpc_error(chain: TestChain) -> None:
    """In strict mode an RPC that cannot be reached at start is fatal."""
    contract = chain.deploy_staking()
    down = Web3(FlakyProvider(chain.tester, failures=1000, method=None))
    fatal: list[str] = []
    service, _ = heartbeat_for(chain, contract, True, down, fatal=fatal)

    service.startService()

    [message] = fatal
    assert "cannot read this node's registration" in message
    assert "connection refused (test RPC)" in message
    assert "http://127.0.0.1:8545" in message


def test_strict_mode_starts_when_registered_and_active(chain: TestChain) -> None:
    """In strict mode a registered, active node runs and sends heartbeats."""
    contract = chain.deploy_staking()
    fatal: list[str] = []
    service, clock = heartbeat_for(chain, contract, strict=True, fatal=fatal)

    service.startService()
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS)

    assert fatal == []
    assert len(chain.transactions_from(chain.operator.address)) == 1
    service.stopService()


def test_unregistered_without_strict_mode_is_logged_and_runs(
    chain: TestChain, logged: list[str]
) -> None:
    """Without strict mode an unregistered node is a warning and heartbeats go on."""
    contract = chain.deploy_staking(registered=False)
    fatal: list[str] = []
    service, clock = heartbeat_for(chain, contract, fatal=fatal)

    service.startService()
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS)

    assert fatal == []
    assert any("is not registered" in line and "running anyway" in line
               for line in logged)  # fmt: skip
    assert len(chain.transactions_from(chain.operator.address)) == 1
    service.stopService()


def test_check_registration_reads_the_tuple(chain: TestChain) -> None:
    """check_registration fires with the decoded getNodeInfo tuple."""
    contract = chain.deploy_staking()
    service, _ = heartbeat_for(chain, contract)

    found: list[Any] = []
    service.check_registration().addCallback(found.append)

    [result] = found
    assert result.registered
    assert result.operator == chain.operator.address
    assert result.http_url == "https://node.example"
    assert result.stake == 10_000 * TOKENS
    assert result.currently_active
    assert result.pending_rewards == 25 * TOKENS // 10
    assert service.chain_id == chain.web3.eth.chain_id


def test_check_registration_runs_once(chain: TestChain) -> None:
    """Awaiting the check before start does not make start read it again."""
    contract = chain.deploy_staking()
    provider = FlakyProvider(chain.tester, failures=0, method=None)
    calls: list[str] = []
    original = provider.make_request

    def counting(method: Any, params: Any) -> Any:
        calls.append(method)
        return original(method, params)

    provider.make_request = counting  # type: ignore[method-assign]
    service, _ = heartbeat_for(chain, contract, web3=Web3(provider))

    service.check_registration()
    service.startService()

    assert calls.count("eth_call") == 1
    service.stopService()


# -- Failures and retries ------------------------------------------------------------


def test_rpc_failing_twice_then_working_gets_one_heartbeat_through(
    chain: TestChain, registry: Any
) -> None:
    """
    Two failed sends are retried with backoff and the third gets exactly one
    heartbeat mined.
    """
    contract = chain.deploy_staking()
    provider = FlakyProvider(chain.tester, failures=2, method="eth_sendRawTransaction")
    service, clock = heartbeat_for(chain, contract, web3=Web3(provider))

    service.startService()
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS)
    clock.advance(60)
    after_two = len(chain.transactions_from(chain.operator.address))
    clock.advance(120)

    assert provider.failed == 2
    assert after_two == 0
    assert len(chain.transactions_from(chain.operator.address)) == 1
    assert count(registry, "rpc_error") == 2
    assert count(registry, "ok") == 1
    service.stopService()


def test_failure_reason_is_logged(chain: TestChain, logged: list[str]) -> None:
    """A failed heartbeat is logged with its reason and when it is retried."""
    contract = chain.deploy_staking()
    provider = FlakyProvider(chain.tester, failures=1, method="eth_sendRawTransaction")
    service, clock = heartbeat_for(chain, contract, web3=Web3(provider))

    service.startService()
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS)

    assert any(
        "operator heartbeat failed: ConnectionError: connection refused (test RPC)"
        in line
        and "retrying in 60s" in line
        for line in logged
    )
    service.stopService()


def test_retries_stop_before_the_next_tick(chain: TestChain, registry: Any) -> None:
    """
    Backoff retries are not made when they would come at or after the next
    tick; the tick then tries again.
    """
    contract = chain.deploy_staking()
    provider = FlakyProvider(
        chain.tester, failures=1000, method="eth_sendRawTransaction"
    )
    # A tick every 180 s: attempts at 5 and 65 (+60); +120 would be the tick.
    service, clock = heartbeat_for(
        chain, contract, web3=Web3(provider), GITLAWB_HEARTBEAT_INTERVAL_HOURS="0.05"
    )

    service.startService()
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS)
    clock.advance(179)
    before_tick = count(registry, "rpc_error")
    clock.advance(1)

    assert before_tick == 2
    assert count(registry, "rpc_error") == 3
    service.stopService()


def test_reverted_heartbeat_is_counted_as_reverted(
    chain: TestChain, registry: Any
) -> None:
    """A heartbeat the contract refuses is counted under result="reverted"."""
    # Code that always reverts (PUSH1 0  DUP1  REVERT): the registration read
    # fails too, which without strict mode is only logged.
    runtime = bytes([0x60, 0x00, 0x80, 0xFD])
    tx = chain.web3.eth.send_transaction(
        {"from": chain.funder, "data": returning(runtime)}
    )
    contract = chain.web3.eth.get_transaction_receipt(tx)["contractAddress"]
    web3 = Web3(FlakyProvider(chain.tester))
    service, clock = heartbeat_for(chain, str(contract), web3=web3)

    service.startService()
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS)

    assert count(registry, "reverted") == 1
    assert chain.transactions_from(chain.operator.address) == []
    service.stopService()


# -- Shutdown --------------------------------------------------------------------


def test_shutdown_while_idle_is_immediate(chain: TestChain) -> None:
    """Between heartbeats, stopping fires at once and leaves no timer."""
    contract = chain.deploy_staking()
    service, clock = heartbeat_for(chain, contract)
    service.startService()
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS)

    stopped = service.stopService()

    assert stopped.called
    assert clock.getDelayedCalls() == []


def test_shutdown_awaits_the_heartbeat_in_flight(
    chain: TestChain, registry: Any
) -> None:
    """
    Stopping while a sent heartbeat waits for its receipt waits for the
    receipt, then fires.
    """
    contract = chain.deploy_staking()
    chain.pause_mining()
    service, clock = heartbeat_for(chain, contract)
    service.startService()
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS)

    stopped = service.stopService()
    waiting = stopped.called
    chain.mine()
    clock.advance(2)

    assert not waiting
    assert stopped.called
    assert count(registry, "ok") == 1
    assert service.cut_off == 0
    assert clock.getDelayedCalls() == []


def test_shutdown_abandons_the_heartbeat_at_the_grace_deadline(
    chain: TestChain, registry: Any, logged: list[str]
) -> None:
    """
    A receipt that does not come by the grace deadline is abandoned: stop
    fires, the heartbeat counts as abandoned, and no timer is left.
    """
    contract = chain.deploy_staking()
    chain.pause_mining()
    service, clock = heartbeat_for(chain, contract, GITLAWB_SHUTDOWN_GRACE_SECS="10")
    service.startService()
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS)

    stopped = service.stopService()
    clock.advance(9)
    before_deadline = stopped.called
    clock.advance(1)

    assert not before_deadline
    assert stopped.called
    assert count(registry, "abandoned") == 1
    assert service.cut_off == 1
    assert clock.getDelayedCalls() == []
    assert any("abandoned at the shutdown grace deadline" in line for line in logged)


def test_shutdown_abandons_a_blocked_rpc_call(chain: TestChain) -> None:
    """
    A worker still blocked on the RPC at the grace deadline is let go: stop
    fires, and its late answer changes nothing.
    """
    contract = chain.deploy_staking()
    pool = HeldPool()
    reactor = ThreadlessReactor(pool)
    service, clock = heartbeat_for(chain, contract, reactor=reactor)
    service.startService()
    pool.run_next()  # chain id
    pool.run_next()  # getNodeInfo
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS)
    assert len(pool.held) == 1  # the send, blocked

    stopped = service.stopService()
    clock.advance(30)
    pool.run_next()

    assert stopped.called
    assert stopped.result is None
    assert pool.held == []
    assert clock.getDelayedCalls() == []


# -- Secrets, settings, metrics --------------------------------------------------


def test_private_key_never_logged(chain: TestChain, logged: list[str]) -> None:
    """The operator key appears in no log line, through start, failures and stop."""
    contract = chain.deploy_staking(registered=False)
    provider = FlakyProvider(chain.tester, failures=3, method="eth_sendRawTransaction")
    service, clock = heartbeat_for(chain, contract, web3=Web3(provider))
    key = chain.operator.key.hex().removeprefix("0x")

    service.startService()
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS)
    clock.advance(3600)
    service.stopService()

    assert logged
    assert not [line for line in logged if key in line.lower()]


def test_bad_private_key_is_a_config_error_without_the_key(chain: TestChain) -> None:
    """A key that is not 32 bytes of hex is refused without being quoted."""
    settings = Settings.load(
        {
            "GITLAWB_CONTRACT_NODE_STAKING": "0x" + "11" * 20,
            "GITLAWB_OPERATOR_PRIVATE_KEY": "0xnot-a-key-but-secret",
        }
    )

    with pytest.raises(ConfigError) as raised:
        OperatorHeartbeat(
            Clock(), settings, NODE_DID, web3_factory=lambda u: chain.web3
        )

    assert "GITLAWB_OPERATOR_PRIVATE_KEY" in str(raised.value)
    assert "secret" not in str(raised.value)
    assert raised.value.__context__ is None


def test_bad_contract_address_is_a_config_error(chain: TestChain) -> None:
    """A staking contract that is not an address is refused at construction."""
    settings = settings_for("0x1234", chain.operator)

    with pytest.raises(ConfigError) as raised:
        OperatorHeartbeat(
            Clock(), settings, NODE_DID, web3_factory=lambda u: chain.web3
        )

    assert "GITLAWB_CONTRACT_NODE_STAKING" in str(raised.value)


def test_seconds_since_last_heartbeat(chain: TestChain, registry: Any) -> None:
    """The age gauge counts from start, and from each mined heartbeat."""
    contract = chain.deploy_staking()
    service, clock = heartbeat_for(chain, contract)

    def age() -> float:
        value = registry.get_sample_value("gitlawb_operator_heartbeat_age_seconds")
        return float(value)

    service.startService()
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS - 1)
    before = age()
    clock.advance(1)
    at_heartbeat = age()
    clock.advance(100)

    assert before == FIRST_HEARTBEAT_DELAY_SECS - 1
    assert at_heartbeat == 0
    assert age() == 100
    service.stopService()


def test_metrics_without_a_registry_are_a_no_op(chain: TestChain) -> None:
    """Before the node's metrics exist, recording does nothing."""
    metrics.reset()
    contract = chain.deploy_staking()
    service, clock = heartbeat_for(chain, contract)

    service.startService()
    clock.advance(FIRST_HEARTBEAT_DELAY_SECS)

    assert len(chain.transactions_from(chain.operator.address)) == 1
    service.stopService()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://sepolia.base.org", "https://sepolia.base.org"),
        (
            "https://base-mainnet.g.alchemy.com/v2/SECRET",
            "https://base-mainnet.g.alchemy.com",
        ),
        (
            "https://user:SECRET@rpc.example:8443/x?key=SECRET",
            "https://rpc.example:8443",
        ),
        ("http://[::1]:8545", "http://[::1]:8545"),
    ],
)
def test_public_rpc_url_drops_credentials(url: str, shown: str) -> None:
    """An RPC URL is shown as scheme, host and port only."""
    assert public_rpc_url(url) == shown


@pytest.mark.parametrize(
    ("amount", "text"),
    [(0, "0"), (10_000 * TOKENS, "10000"), (10_500 * TOKENS // 1000, "10.50")],
)
def test_format_tokens(amount: int, text: str) -> None:
    """Token amounts show as whole tokens with two decimals when fractional."""
    assert format_tokens(amount) == text

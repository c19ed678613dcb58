"""
C{GET /api/v1/contracts}: the chain and the contract addresses, in the
reference node's shape, through StubTreq on a Klein app.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from klein import Klein
from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from gitlawb.api.contracts import contracts_body, install
from gitlawb.config import ConfigError, Settings

STAKING = "0x" + "ab" * 20
DID_REGISTRY = "0x" + "cd" * 20


def settings(**environ: str) -> Settings:
    return Settings.load(environ)


class ContractsRouteTests(SynchronousTestCase):
    def get(self, settings: Settings, services: dict[str, Any]) -> Any:
        app = Klein()
        install(app, SimpleNamespace(settings=settings, services=services))  # type: ignore[arg-type]
        treq = StubTreq(app.resource())
        # StubTreq makes its request methods at run time.
        requesting = treq.get("http://node.example/api/v1/contracts")  # type: ignore[attr-defined]
        response = self.successResultOf(requesting)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"), ["application/json"]
        )
        return json.loads(self.successResultOf(response.content()))

    def test_default_body_is_the_reference_shape(self) -> None:
        """With nothing configured the body names Base Sepolia and no contracts."""
        body = self.get(settings(), {})

        self.assertEqual(
            body,
            {
                "chain": "base-sepolia",
                "chain_id": 84532,
                "rpc_url": "https://sepolia.base.org",
                "contracts": {
                    "did_registry": None,
                    "name_registry": None,
                    "node_staking": None,
                },
                "arweave": {"enabled": False, "irys_url": None},
            },
        )

    def test_configured_addresses_are_served(self) -> None:
        """The configured contract addresses are served as given."""
        body = self.get(
            settings(
                GITLAWB_CONTRACT_NODE_STAKING=STAKING,
                GITLAWB_CONTRACT_DID_REGISTRY=DID_REGISTRY,
                GITLAWB_CHAIN_RPC_URL="https://mainnet.base.org",
            ),
            {},
        )

        self.assertEqual(body["contracts"]["node_staking"], STAKING)
        self.assertEqual(body["contracts"]["did_registry"], DID_REGISTRY)
        self.assertEqual(body["chain"], "base")
        self.assertEqual(body["chain_id"], 8453)

    def test_observed_chain_id_wins_over_the_guess(self) -> None:
        """The chain id the heartbeat read from the RPC is served once known."""
        heartbeat = SimpleNamespace(chain_id=31337)

        body = self.get(settings(), {"operator_heartbeat": heartbeat})

        self.assertEqual(body["chain_id"], 31337)
        self.assertIsNone(body["chain"])


def test_rpc_url_is_served_without_its_key() -> None:
    """Only the RPC URL's scheme, host and port are served."""
    body = contracts_body(
        settings(GITLAWB_CHAIN_RPC_URL="https://base-sepolia.g.example/v2/SECRET"),
        None,
    )

    assert body["rpc_url"] == "https://base-sepolia.g.example"
    assert body["chain_id"] == 84532


def test_registry_address_setting_is_checked() -> None:
    """A registry address that is not 20 bytes of hex is a configuration error."""
    with pytest.raises(ConfigError) as raised:
        settings(GITLAWB_CONTRACT_NAME_REGISTRY="0x1234")

    assert "GITLAWB_CONTRACT_NAME_REGISTRY" in str(raised.value)

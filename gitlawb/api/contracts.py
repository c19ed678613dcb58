"""
C{GET /api/v1/contracts}: the chain this node's network lives on and the
addresses of its contracts, with no authentication.

The body has the reference node's shape::

    {"chain": "base-sepolia", "chain_id": 84532,
     "rpc_url": "https://sepolia.base.org",
     "contracts": {"did_registry": null, "name_registry": null,
                   "node_staking": "0x..."},
     "arweave": {"enabled": false, "irys_url": null}}

Two differences, both deliberate: C{contracts.node_staking} is added, and
C{rpc_url} is only the scheme, host and port of C{GITLAWB_CHAIN_RPC_URL},
because hosted RPC services put their API key in the rest.  C{chain_id} is
the one the RPC reported when the operator heartbeat has asked it, else the
reference's guess from the URL; C{chain} is C{null} for a chain other than
Base or Base Sepolia.  This node does no Arweave anchoring.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from gitlawb.api.app import NodeContext
from gitlawb.api.errors import write_json
from gitlawb.chain_info import (
    KNOWN_CHAINS,
    effective_rpc_url,
    guess_chain_id,
    public_rpc_url,
)
from gitlawb.config import Settings


def contracts_body(settings: Settings, observed_chain_id: int | None) -> dict[str, Any]:
    """
    The body of C{GET /api/v1/contracts}.

    @param observed_chain_id: the chain id the RPC reported, if known.
    """
    rpc_url = effective_rpc_url(settings)
    chain_id = observed_chain_id or guess_chain_id(rpc_url)
    return {
        "chain": KNOWN_CHAINS.get(chain_id),
        "chain_id": chain_id,
        "rpc_url": public_rpc_url(rpc_url),
        "contracts": {
            "did_registry": settings.contract_did_registry or None,
            "name_registry": settings.contract_name_registry or None,
            "node_staking": settings.contract_node_staking.strip() or None,
        },
        "arweave": {"enabled": False, "irys_url": None},
    }


def install(app: Klein, context: NodeContext) -> None:
    @app.route("/api/v1/contracts", methods=["GET"])
    def contracts(request: IRequest) -> bytes:
        request.route_template = "/api/v1/contracts"  # type: ignore[attr-defined]
        heartbeat = context.services.get("operator_heartbeat")
        observed = getattr(heartbeat, "chain_id", None)
        return write_json(request, 200, contracts_body(context.settings, observed))

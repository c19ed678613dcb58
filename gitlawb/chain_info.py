"""
What the node says about the chain without talking to it: which chains are
known, which RPC URL the heartbeat uses and how it may be shown, whether the
operator heartbeat is configured.  Kept apart from L{gitlawb.chain} so that
serving C{/api/v1/contracts} does not import web3.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

from gitlawb.config import Settings

#: Where heartbeats go when C{GITLAWB_CHAIN_RPC_URL} is empty, as with the
#: reference node: the public Base Sepolia endpoint.
DEFAULT_RPC_URL: Final = "https://sepolia.base.org"

#: Chain ids the network runs on, by the names the API gives them.
KNOWN_CHAINS: Final = {8453: "base", 84532: "base-sepolia"}


def operator_heartbeat_enabled(settings: Settings) -> bool:
    """
    Whether this node keeps an operator heartbeat: both the staking contract
    and the operator key are set.
    """
    return bool(settings.contract_node_staking and settings.operator_private_key)


def effective_rpc_url(settings: Settings) -> str:
    return settings.chain_rpc_url.strip() or DEFAULT_RPC_URL


def guess_chain_id(rpc_url: str) -> int:
    """
    The chain an RPC URL most likely serves, by the reference node's rule:
    Base Sepolia when the URL says "sepolia", Base otherwise.
    """
    return 84532 if "sepolia" in rpc_url.lower() else 8453


def public_rpc_url(rpc_url: str) -> str:
    """
    An RPC URL as it may be shown: scheme, host and port only.  Hosted RPC
    services put the API key in the path, the query or the user part.
    """
    parts = urlsplit(rpc_url)
    if not parts.hostname:
        return "<unparsable URL>"
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"

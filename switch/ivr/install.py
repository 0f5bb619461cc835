"""Wiring of the IVR channel into a node (called by `switch.components`)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from switch.ivr.api import IVR_OPENAPI, register
from switch.ivr.service import IvrService

if TYPE_CHECKING:
    from switch.node import Node


async def install(node: Node, stack: contextlib.AsyncExitStack) -> None:
    """Add the IVR service, its routes and its OpenAPI paths to the node.

    Nothing to open or close: the channel uses the node's pool, Redis client, HSM client,
    ledger and forwarder, and keeps its call state in Redis.
    """
    node.components["ivr"] = IvrService(node)
    node.components.setdefault("routes", []).append(register)
    node.components.setdefault("openapi_paths", []).append(IVR_OPENAPI)

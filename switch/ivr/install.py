"""Wiring of the IVR channel into a node (called by `switch.components`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from switch.ivr.api import IVR_OPENAPI, register
from switch.ivr.service import IvrService
from switch.ivr.store import CALL_LOCK_PREFIX, CARD_LOCK_PREFIX

if TYPE_CHECKING:
    from switch.node import Node

log = logging.getLogger("gridpay.ivr")


async def install(node: Node, stack: contextlib.AsyncExitStack) -> None:
    """Add the IVR service, its routes and its OpenAPI paths to the node.

    Nothing to open or close: the channel uses the node's pool, Redis client, HSM client,
    ledger and forwarder, and keeps its call state in Redis.
    """
    node.components["ivr"] = IvrService(node)
    node.components.setdefault("routes", []).append(register)
    node.components.setdefault("openapi_paths", []).append(IVR_OPENAPI)

    async def took_over() -> None:
        # the turn and card locks the previous active node left would hold a call's next turn
        # for up to 15 s (409 turn_in_progress), longer than a caller waits: dropped, in the
        # background. Dropping one this node has just taken is harmless: a call is saved by
        # compare-and-set on its version, and a card is redeemed once by PostgreSQL.
        node.components["ivr_drop_locks"] = asyncio.create_task(
            drop_abandoned_locks(node), name="ivr-drop-locks")

    node.hooks.on_active.append(took_over)


async def drop_abandoned_locks(node: Node) -> None:
    from switch.standby import drop_locks

    try:
        n = 0
        for prefix in (CALL_LOCK_PREFIX, CARD_LOCK_PREFIX):
            n += await drop_locks(node.redis, prefix)
    except Exception as e:  # Redis down: the locks expire by themselves
        log.warning("could not clear abandoned IVR locks", extra={"error": type(e).__name__})
        return
    if n:
        log.info("abandoned IVR locks cleared", extra={"locks": n})

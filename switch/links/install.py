"""Wiring of the bank and post-office links into a node."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from protocols.iso8583 import builtin_dialect
from switch.links.server import LinkListener
from switch.links.service import LinkService, link_context

if TYPE_CHECKING:
    from switch.node import Node


async def install(node: Node, stack: contextlib.AsyncExitStack) -> None:
    s = node.settings
    service = LinkService(link_context(node))
    listeners = {
        "bank": LinkListener(builtin_dialect("bank"), s.listen.host, s.listen.bank_port,
                             s.links, s.institutions, service, node.metrics),
        "post": LinkListener(builtin_dialect("post"), s.listen.host, s.listen.post_port,
                             s.links, s.institutions, service, node.metrics),
    }
    node.components["links"] = listeners
    node.components["link_service"] = service

    async def active() -> None:
        node.ports.bank = await listeners["bank"].start()
        node.ports.post = await listeners["post"].start()

    async def standby() -> None:
        for lst in listeners.values():
            await lst.stop(s.node.shutdown_grace_s)
        node.ports.bank = node.ports.post = None

    # links open after the ledger is running and close before it stops
    node.hooks.on_active.append(active)
    node.hooks.on_standby.insert(0, standby)

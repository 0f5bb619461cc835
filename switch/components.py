"""Wiring: the components of a node, opened in order and closed in reverse."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from switch.node import Node


async def install_components(node: Node, stack: contextlib.AsyncExitStack) -> None:
    """Open every component of the node; each registers its role hooks on `node.hooks`."""
    return None

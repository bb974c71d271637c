"""The authority's view of the cluster's nodes (a mixin of sandbox.ray.authority.Authority): each
node's memory from `nodes()` (Ray's node table, re-read every `refresh` seconds and at once for a node
not seen yet) or, without it, from attach's `node_memory` (persisted). A node that leaves the table
loses its attach waiters at once and keeps its leases, which lapse (see the authority's docstring)."""

from __future__ import annotations

import asyncio
import logging

from .leases import Node

log = logging.getLogger("sandbox.ray.authority")


class NodeTable:
    """Needs the Authority's `_nodes`, `_nodes_fn`, `refresh`, `_refreshing`, `_leases`,
    `_attaching`, `_changed`, `_pump_node` and `_unblock`."""

    async def _known_node(self, node_id: str, node_memory: int | None) -> str | None:
        """None once `node_id` is a known node, else why not."""
        if self._nodes_fn is not None:
            if node_id not in self._nodes:
                await self._refresh_nodes()
            return None if node_id in self._nodes else f"node {node_id} is not a live node"
        node = self._nodes.get(node_id)
        if node_memory is None:
            return None if node else f"node {node_id} is unknown: attach needs its node_memory"
        if node is None:
            self._nodes[node_id] = Node(node_memory, given=True)
            self._changed()
        elif node.total != node_memory:
            node.total = node_memory
            self._changed()
            self._pump_node(node_id)
        return None

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh)
            await self._refresh_nodes()

    async def _refresh_nodes(self) -> None:
        """One `nodes()` call at a time, shared by whoever asks meanwhile."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._read_nodes())
        await asyncio.shield(self._refreshing)

    async def _read_nodes(self) -> None:
        try:
            live = await asyncio.to_thread(self._nodes_fn)
        except Exception as err:  # noqa: BLE001 - the cluster view is unknown: keep the last one
            log.warning("the authority could not list the cluster's nodes: %s", err)
            return
        for gone in [n for n in self._nodes if n not in live]:
            node = self._nodes.pop(gone)  # its leases lapse: a node cut off may still be running their jobs
            for _, lease_id in node.queue:
                self._unblock(self._leases[lease_id])
                self._attaching.pop(lease_id).future.set_result({"lost": f"node {gone} is gone"})
        for name, memory in live.items():  # nodes of nodes() are not persisted: no change to save
            node = self._nodes.get(name)
            if node is None:  # new, or back (its leases that have not lapsed still hold their memory)
                node = self._nodes[name] = Node(memory, given=False)
                for lease in self._leases.values():
                    if lease.node == name:
                        node.reserved += lease.reserved
                        node.leases.add(lease.lease_id)
            elif node.total != memory:
                node.total = memory
                self._pump_node(name)

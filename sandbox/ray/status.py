"""`taichi-sandbox cluster`: what the cluster's quota authority holds, for operators. Connects to the
Ray cluster as a driver, reads the authority's `usage()` and never creates an authority."""

from __future__ import annotations

from rich.table import Table

from ..core.display import size
from ..core.limits import ConfigError
from .actor import NAME, NAMESPACE
from .options import _ray

TIMEOUT = 30.0


def read(address: str) -> dict:
    """The authority's usage (see Authority.usage, plus `calls`); ConfigError (one line) when Ray or
    the authority cannot be reached."""
    ray = _ray()
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except Exception as err:  # noqa: BLE001 - Ray's reasons vary: one line for all of them
        raise ConfigError(f"cluster: cannot connect to the Ray cluster at {address!r}: {err}") from None
    try:
        try:
            handle = ray.get_actor(NAME, namespace=NAMESPACE)
        except ValueError:
            raise ConfigError("cluster: no quota authority in this cluster yet (the first sandbox.ray.submit or "
                              "RayExecutor starts it)") from None
        try:
            return ray.get(handle.usage.remote(), timeout=TIMEOUT)
        except ray.exceptions.RayError as err:
            raise ConfigError(f"cluster: the quota authority did not answer: {type(err).__name__}") from None
    finally:
        ray.shutdown()


def tables(usage: dict) -> list[Table]:
    """The tenants' and the nodes' tables."""
    tenants = Table(title=f"tenants (quota authority, epoch {usage.get('epoch', 0)}: "
                          f"{usage.get('leases', 0)} leases, {usage.get('waiting', 0)} waiting)")
    for column in ("tenant", "running", "waiting", "memory", "gpu memory"):
        tenants.add_column(column)
    for name, t in sorted(usage.get("tenants", {}).items()):
        tenants.add_row(name, str(t["running"]), str(t["waiting"]), size(t["memory"]), size(t["gpu_memory"]))
    nodes = Table(title="nodes")
    for column in ("node", "leases", "waiting", "memory reserved", "memory"):
        nodes.add_column(column)
    for node_id, n in sorted(usage.get("nodes", {}).items()):
        nodes.add_row(node_id[:12], str(n["leases"]), str(n["waiting"]), size(n["memory_reserved"]),
                      size(n["memory_total"]))
    return [tenants, nodes]

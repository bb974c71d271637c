"""Who a client is, from the kernel (SO_PEERCRED), and which tenants it may name.

A client may name tenant X when its uid or one of its groups (the peer's gid and the user's
supplementary groups) is listed in `[tenants.X] users` / `groups` (names or numbers); root may name
any tenant. Naming none, it gets the first tenant that lists it; a client no tenant lists gets the
`default` tenant, or is refused with `[service] unknown_users = "refuse"`. Members of `[service]
operators_group` see every tenant (never act for one).
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

from ..core.limits import ConfigError, Policy
from ..core.models import JobSpec
from .future import DEFAULT_TENANT as NO_TENANT  # where the jobs of no tenant are counted

DEFAULT_TENANT = "default"


class Refused(Exception):
    """The client may not use the tenant it named (or any); the message is one line."""


@dataclass(frozen=True)
class Peer:
    """The client process at the other end of a connection (from the kernel, not from the client)."""

    pid: int
    uid: int
    gid: int
    user: str
    groups: frozenset[int]

    def audit(self) -> dict:
        return {"uid": self.uid, "user": self.user, "client_pid": self.pid, "host": socket.gethostname()}


def peer_of(conn: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    user, groups = _identity(uid, gid)
    return Peer(pid, uid, gid, user, groups)


@functools.lru_cache(maxsize=4096)
def _identity(uid: int, gid: int) -> tuple[str, frozenset[int]]:
    """(user name, groups) from the user database, looked up once per uid and gid while the service
    runs (a flood of connections costs no lookups; membership changes apply at its restart)."""
    try:
        entry = pwd.getpwuid(uid)
        return entry.pw_name, frozenset(os.getgrouplist(entry.pw_name, gid)) | {gid}
    except KeyError:
        return str(uid), frozenset({gid})


@functools.lru_cache(maxsize=4096)
def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def _listed(peer: Peer, users: list, groups: list) -> bool:
    names = {str(u) for u in users}
    if str(peer.uid) in names or peer.user in names:
        return True
    wanted = {str(g) for g in groups}
    return any(str(gid) in wanted or _group_name(gid) in wanted for gid in peer.groups)


def may_use(policy: Policy, peer: Peer, tenant: str) -> bool:
    """Whether `peer` may submit as, see and cancel the jobs of `tenant`."""
    entry = policy.tenants.get(tenant)
    return peer.uid == 0 or (entry is not None and _listed(peer, entry.users, entry.groups))


def is_operator(policy: Policy, peer: Peer) -> bool:
    """Whether `peer` sees every tenant in `quota`, `ps` and `events`: root, or a member of
    `[service] operators_group` (a name or gid)."""
    group = policy.service.operators_group
    return peer.uid == 0 or (group is not None and _listed(peer, [], [group]))


def sees(policy: Policy, peer: Peer, tenant: str) -> bool:
    """Whether `peer` sees `tenant` in `quota`: an operator, a tenant it may use, or the one its jobs
    go to without naming one."""
    if is_operator(policy, peer) or may_use(policy, peer, tenant):
        return True
    try:
        return tenant == (tenant_for(policy, peer, None) or NO_TENANT)
    except Refused:
        return False


def tenant_for(policy: Policy, peer: Peer, requested: str | None) -> str | None:
    """The tenant `peer`'s job runs as (None: the executor's own default). Raises Refused."""
    if requested is not None:
        if requested not in policy.tenants:
            raise Refused(f"tenant {requested!r}: no such tenant")
        if not may_use(policy, peer, requested):
            raise Refused(f"uid {peer.uid} ({peer.user}) may not submit as tenant {requested!r}: "
                          "neither the user nor one of its groups is in its users/groups")
        return requested
    for name, entry in policy.tenants.items():
        if _listed(peer, entry.users, entry.groups):
            return name
    if policy.service.unknown_users == "refuse":
        raise Refused(f"uid {peer.uid} ({peer.user}) is in no tenant's users/groups and "
                      '[service] unknown_users = "refuse"')
    return DEFAULT_TENANT if DEFAULT_TENANT in policy.tenants else None


def within_rights(policy: Policy, spec: JobSpec) -> JobSpec:
    """`spec` as a client may have it: limits no higher than its tenant's profile, or, for a job
    without a tenant, than [defaults] (`Policy.resolve` lets an in-process caller without a tenant go
    higher: the node is theirs); a priority no higher than its tenant's, nor its job type's (a job
    type cannot lift a job past its tenant). An explicit priority above that is refused; the one a
    job type would give is lowered to it. Raises ConfigError naming what is too high."""
    limits = policy.resolve(spec.profile, spec.tenant, spec.limits, spec.job_type)
    if spec.tenant is None:
        above = limits.above(policy.defaults)
        if above:
            raise ConfigError(f"a job without a tenant may lower its limits, not raise them past [defaults]: "
                              f"{'; '.join(above)}")
    tenant = policy.tenants.get(spec.tenant or "")
    ceiling, whose = (tenant.priority if tenant else 0), f"tenant {spec.tenant or DEFAULT_TENANT!r}"
    job_type = policy.job_types[spec.job_type] if spec.job_type is not None else None
    if job_type is not None and job_type.priority < ceiling:
        ceiling, whose = job_type.priority, f"job type {spec.job_type!r}"
    if spec.priority is not None and spec.priority > ceiling:
        raise ConfigError(f"priority {spec.priority} is above {whose}'s {ceiling}: a job may lower its "
                          "priority, not raise it")
    if spec.priority is None and job_type is not None and job_type.priority > ceiling:
        return spec.model_copy(update={"priority": ceiling})
    return spec


def check_names(policy: Policy) -> None:
    """Every user and group a tenant lists exists (numbers always do). Raises ConfigError."""
    for name, entry in policy.tenants.items():
        for kind, values, lookup in (("users", entry.users, pwd.getpwnam), ("groups", entry.groups, grp.getgrnam)):
            for value in values:
                if isinstance(value, int) or value.isdigit():
                    continue
                try:
                    lookup(value)
                except KeyError:
                    raise ConfigError(f"{policy.source} [tenants.{name}] {kind}: no such "
                                      f"{kind[:-1]} {value!r}") from None

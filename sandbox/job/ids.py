"""Which uid and gid a tenant's jobs run as (supervisor side).

A root supervisor runs each tenant's jobs as that tenant's own unprivileged ids: `run_as` in the
tenant's table (a user name, "UID" or "UID:GID"), or one taken from `[sandbox] uid_range` and kept
in `<state_dir>/uids.json`, so a tenant keeps its uid (and its offline cache) across restarts, like
isolate's box uids. A supervisor that is not root runs jobs as itself.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
from dataclasses import dataclass

from ..core.limits import ConfigError, Policy
from .mounts import permits

MAP_FILE = "uids.json"


@dataclass(frozen=True)
class Ids:
    uid: int
    gid: int


def _parse_run_as(value: str, where: str) -> Ids:
    uid_text, _, gid_text = value.partition(":")
    try:
        if uid_text.isdigit():
            uid = int(uid_text)
            gid = int(gid_text) if gid_text else uid
        else:
            entry = pwd.getpwnam(uid_text)
            uid, gid = entry.pw_uid, int(gid_text) if gid_text else entry.pw_gid
    except (KeyError, ValueError):
        raise ConfigError(f"{where}: run_as={value!r}: no such user (a name, UID or UID:GID)") from None
    if uid == 0 or gid == 0:
        raise ConfigError(f"{where}: run_as={value!r}: not root (use allow_root to run jobs as root)")
    return Ids(uid, gid)


def parse_range(value: str) -> range:
    """'60000-60999' → range(60000, 61000)."""
    low, _, high = value.partition("-")
    try:
        first, last = int(low), int(high)
    except ValueError:
        raise ConfigError(f"[sandbox] uid_range={value!r}: expected FIRST-LAST, e.g. 60000-60999") from None
    if not 0 < first <= last < 1 << 31:
        raise ConfigError(f"[sandbox] uid_range={value!r}: expected 0 < FIRST <= LAST")
    return range(first, last + 1)


def tenant_ids(policy: Policy, tenant: str) -> Ids:
    """The tenant's own ids: its `run_as`, else the one it was given from the range."""
    entry = policy.tenants.get(tenant)
    if entry is not None and entry.run_as:
        return _parse_run_as(entry.run_as, f"{policy.source} [tenants.{tenant}]")
    state = policy.settings.resolved_state_dir()
    state.mkdir(parents=True, exist_ok=True)
    uids = parse_range(policy.settings.uid_range)
    path = state / MAP_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # several supervisors may share a state dir
        text = f.read()
        try:
            assigned: dict[str, int] = json.loads(text) if text.strip() else {}
        except ValueError:
            raise ConfigError(f"{path}: invalid uid map") from None
        if tenant not in assigned:
            taken = set(assigned.values())
            free = next((u for u in uids if u not in taken), None)
            if free is None:
                raise ConfigError(f"[sandbox] uid_range={policy.settings.uid_range!r}: every uid is taken")
            assigned[tenant] = free
            f.seek(0)
            f.truncate()
            f.write(json.dumps(assigned, indent=1, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
    return Ids(assigned[tenant], assigned[tenant])


def may_read(path: str, ids: Ids) -> bool:
    """Whether the job may read the file `path` itself; the directories above it the job's mount
    namespace makes passable (see mounts.expose_paths)."""
    return permits(path, ids.uid, ids.gid, 0o004)

"""What a job in its own cgroup namespace may see of cgroups: its own cgroup as the root of each
hierarchy it joined, and nothing else (no other job's directory, id or usage).

Pure: reads mountinfo text, returns what to mount; sandbox.job.mounts mounts it in the job's
mount namespace (`private_cgroups`).
"""

from __future__ import annotations

from .host import CGROUP_ROOT, parse_mountinfo


def joined_hierarchies(mountinfo: str, join_files: list[str]) -> list[tuple[str, str, str | None]]:
    """(place under /sys/fs/cgroup, fstype, mount data) of each host hierarchy mounted there that
    holds one of `join_files` (JobCgroup.join_files), for a fresh mount: inside the job's cgroup
    namespace a fresh mount has the job's cgroup as its root. Place "" is /sys/fs/cgroup itself
    (a unified v2 host). v1 data repeats the hierarchy's own options (its controllers, `name=`):
    the kernel mounts an existing hierarchy only with the options it has."""
    found: dict[str, tuple[str, str | None]] = {}
    for mount in parse_mountinfo(mountinfo):
        under = mount.point == CGROUP_ROOT or mount.point.startswith(CGROUP_ROOT + "/")
        if under and any(path.startswith(mount.point + "/") for path in join_files):
            options = sorted(o for o in mount.options if o not in ("rw", "ro") and not o.startswith("release_agent="))
            found[mount.point[len(CGROUP_ROOT):].lstrip("/")] = (
                mount.fstype, ",".join(options) if mount.fstype == "cgroup" else None)
    return [(place, fstype, data) for place, (fstype, data) in found.items()]

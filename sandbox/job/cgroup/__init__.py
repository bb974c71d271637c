"""Per-job cgroups: the kernel's own accounting and limits for memory, processes and CPU, and an
atomic kill of the whole job. v1 (legacy/hybrid) and v2 (unified) behind one set of verbs.

`discover(mode)` decides once what this supervisor can use (`CgroupHost`); `host.create(job_id,
limits)` makes one job's `JobCgroup`. Polling stays the fallback where no cgroup is writable.
"""

from .common import CgroupError, CgroupLimits, CgroupStats, JobCgroup, task_limit
from .host import CgroupHost, discover

__all__ = ["CgroupError", "CgroupHost", "CgroupLimits", "CgroupStats", "JobCgroup", "discover", "task_limit"]

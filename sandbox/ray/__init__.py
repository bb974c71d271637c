"""Run sandboxed jobs inside Ray tasks, on one node or a cluster. Ray is optional
(`pip install taichi-sandbox[ray]`) and imported lazily; nothing here calls `ray.init`.

The path of a job (`submit`, or RayExecutor, which submits the same way):
  driver     acquire the job's lease from the quota authority (`actor`: one detached actor on the head
             node, its state in the GCS) — a call that returns when the tenant's cluster-wide quotas
             allow the job — and start the Ray task with that call's ref as its argument (`jobs`);
  node       the task attaches the lease to its node (waiting while the node's memory is reserved:
             an unlimited job reserves its node), keeps it renewed (`keeper`), supervises the job here
             or through the node's service (`task`), releases the lease;
  driver     `result()` gives the JobResult, or a verdict for every Ray failure (`outcome`).
Limits map onto Ray resources as `options` says. A lease nobody renews lapses after
`[cluster] lease_ttl` (more when the job's grace needs it); the node ends its job before that
(`keeper`, and the fork-server even when the Ray worker is frozen), and nothing frees it sooner.

`ray.cancel(ref)` ends the job gracefully (SIGTERM, grace, SIGKILL) and returns promptly even while
a kernel runs; `force=True` or a killed worker closes the fork-server's control socket, which makes it
SIGKILL every job process.

On a node with a running node service (`taichi-sandbox serve`), a task submits its job there instead
(`service="auto"`, the default: $TAICHI_SANDBOX_SOCKET on the worker, else the default socket when a
service answers; or a socket path; or None for never). Then the node's policy, admission and quotas
apply to Ray jobs and local users alike, and the tenant is authenticated from the worker's uid; the
`policy` given here sizes the Ray resources and the cluster-wide lease. The task reads the kernel file
and inputs with the worker's permissions and writes the outputs itself; a cancelled task cancels its
job, and a killed worker's job is cancelled when its connection closes.
"""

from __future__ import annotations

from .actor import authority
from .executor import RayExecutor
from .jobs import cancel, result, submit
from .options import resource_options
from .task import run_in_task

__all__ = ["RayExecutor", "authority", "cancel", "resource_options", "result", "run_in_task", "submit"]

"""The node layer: supervising jobs on this node, and the one authority per node (`taichi-sandbox
serve`). Importing this package imports nothing (the thin client needs `frames` alone).

- `supervisor`: one job from spec to verdict (plan, launch, watch, decide, audit); `confinement`:
  the namespaces, uid, system-call filter and cgroup it decides for the job.
- `executor`, `quotas`, `scheduling`, `preemption`, `alerts`, `metrics`: many jobs: admission, quotas,
  priorities, fair share and preemption, alerts, metrics.
- The service: `frames` (length-prefixed JSON and descriptors over a UNIX socket; standard library
  only), `protocol` (the requests, validated), `auth` (who the peer is, which tenants it may name,
  what it may ask), `guard` (per-uid and node bounds), `jobs` (the service's jobs: output, events,
  spool, audit context), `reconcile` (at a restart, the jobs a killed service left), `streams`
  (what flows back to a client), `systemd` (socket path, activation, readiness) and `service`
  (accepting, dispatch, draining).
The service's thin client is `sandbox.client`.
"""

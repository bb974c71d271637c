"""The watch layer: observing a running job and ending it. `tree` (its processes from /proc),
`monitor` (the limit decision and the shared monitor thread), `gpu` (NVML sampling, arch probing,
MPS), `enforcement` (how each limit is enforced, per arch), `pump` (its stdout, stderr and channel),
`terminate` (graceful-then-forced termination of the whole job)."""

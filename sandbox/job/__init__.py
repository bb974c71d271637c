"""The job layer: making and confining the job's processes. `launcher` and `forkserver` (how a job
is started), `child` (the job side: confinement, guarded ti.init, running, reporting), `namespaces`,
`mounts` and `ids` (isolation, the job's mounts and the tenant's uid), `cgroup` (per-job cgroups,
v1 and v2), `inputs`, `files` and `results` (what goes in and comes out), `safefs` (opening,
creating and removing what a tenant controls without resolving its paths by name), `disk` and
`loop` (the job's dir under its disk limit: a filesystem image of its own, or polled)."""

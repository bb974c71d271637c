"""The node service: one long-running authority per node (`taichi-sandbox serve`).

- `frames`: length-prefixed JSON frames over a UNIX socket (client and service; no pydantic).
- `protocol`: the requests the service accepts, validated (service side).
- `auth`: who the peer is (SO_PEERCRED) and which tenants it may name.
- `jobs`: the service's jobs: output, live usage, events, the audit context and restart reconciliation.
- `systemd`: the socket path, socket activation and readiness notification.
- `service`: connection limits, dispatch, draining on SIGTERM.
The thin client is `sandbox.client`.
"""

"""Prometheus metrics for the executor (prometheus-client), in a registry of their own.

Served over HTTP on 127.0.0.1 by default (`serve`) or written to a node-exporter textfile.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, write_to_textfile

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter("taichi_sandbox_jobs", "Finished jobs by verdict and tenant", ["verdict", "tenant"],
                            registry=r)
        self.running = Gauge("taichi_sandbox_running_jobs", "Jobs running now", ["tenant"], registry=r)
        self.queued = Gauge("taichi_sandbox_queued_jobs", "Jobs waiting in the queue", ["tenant"], registry=r)
        self.violations = Counter("taichi_sandbox_violations", "Limit violations by resource", ["resource", "tenant"],
                                  registry=r)
        self.quota_ratio = Gauge("taichi_sandbox_quota_usage_ratio", "Used / quota per tenant and resource",
                                 ["tenant", "resource"], registry=r)
        self.duration = Histogram("taichi_sandbox_job_duration_seconds", "Wall time of finished jobs", ["tenant"],
                                  buckets=DURATION_BUCKETS, registry=r)
        self.queue_wait = Histogram("taichi_sandbox_queue_wait_seconds", "Time from submission to start",
                                    ["tenant"], buckets=DURATION_BUCKETS, registry=r)
        self.rejections = Counter("taichi_sandbox_admission_rejections", "Jobs rejected at admission by reason",
                                  ["reason", "tenant"], registry=r)
        self.preemptions = Counter("taichi_sandbox_preemptions", "Running jobs preempted (ended, or requeued, to "
                                   "make room for a job of a higher priority, or on request)", ["tenant"], registry=r)
        self.alerts_dropped = Counter("taichi_sandbox_alerts_dropped", "Alerts dropped: their delivery queue was full",
                                      registry=r)

    def serve(self, port: int, addr: str = "127.0.0.1"):
        """Start the /metrics HTTP server; returns (server, thread). Port 0 picks a free port."""
        return start_http_server(port, addr=addr, registry=self.registry)

    def write_textfile(self, path: str) -> None:
        write_to_textfile(path, self.registry)

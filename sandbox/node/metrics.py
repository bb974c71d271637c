"""Prometheus metrics for the executor (prometheus-client), in a registry of their own.

Served over HTTP (`serve`: `[service] metrics_address`, loopback by default) or written to a
node-exporter textfile. Three kinds: counters and histograms the executor and the service update as
things happen; gauges read at scrape time from the sources given to `watch` (the quota state: what
is reserved of the node and of each tenant's quotas; the jobs' sampled memory; the queue's oldest
job); and, served over HTTP only, the process's own `process_*`. Every name the
shipped dashboard and alert rules use (deploy/grafana, deploy/prometheus) is one of these.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

import psutil
from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server,
                               write_to_textfile)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)
RESOURCES = ("cpu_slots", "memory", "gpu_memory")  # the node's, as in the quota state


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
        self.memory_pressure = Gauge("taichi_sandbox_node_memory_pressure_percent",
                                     "PSI /proc/pressure/memory some avg10 (absent: the kernel has no PSI)", registry=r)
        self.preemptions = Counter("taichi_sandbox_preemptions", "Running jobs preempted (ended, or requeued, to "
                                   "make room for a job of a higher priority, or on request)", ["tenant"], registry=r)
        self.alerts_dropped = Counter("taichi_sandbox_alerts_dropped", "Alerts dropped: their delivery queue was full",
                                      registry=r)
        self.cpu_seconds = Counter("taichi_sandbox_cpu_seconds", "CPU seconds used by finished jobs", ["tenant"],
                                   registry=r)
        self.refusals = Counter("taichi_sandbox_refused_requests",
                                "Requests the service refused (no job admitted) by reason", ["reason"], registry=r)
        self._live = _Live()
        r.register(self._live)

    def refused(self, reason: str) -> None:
        """Count one refused request (the error code answered, e.g. QueueFull, RateLimited, Refused)."""
        self.refusals.labels(reason).inc()

    def watch(self, name: str, source: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        """Read `source()`'s gauges at every scrape (a later `watch` of the same name replaces it)."""
        self._live.sources[name] = source

    def serve(self, port: int, addr: str = "127.0.0.1"):
        """Start the /metrics HTTP server; returns (server, thread). Port 0 picks a free port. Besides
        the registry it serves this process's `process_*` (CPU, RSS, descriptors, start time), which
        the textfile leaves out (node-exporter serves its own under those names)."""
        served = CollectorRegistry()
        served.register(self.registry)
        ProcessCollector(registry=served)
        return start_http_server(port, addr=addr, registry=served)

    def write_textfile(self, path: str) -> None:
        write_to_textfile(path, self.registry)


class _Live(Collector):
    """The gauges of the sources given to `Metrics.watch`, read at scrape time."""

    def __init__(self) -> None:
        self.sources: dict[str, Callable[[], Iterable[GaugeMetricFamily]]] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for source in list(self.sources.values()):
            yield from source()


def quota_gauges(state: dict) -> list[GaugeMetricFamily]:
    """The quota state (`SandboxExecutor.quota_state`) as gauges: the node's capacity and what jobs
    reserve of it; per tenant what its running jobs reserve and its quotas; and the node's real memory."""
    capacity = GaugeMetricFamily("taichi_sandbox_node_capacity", "The node's capacity (cpu_slots; memory and "
                                 "gpu_memory in bytes)", labels=["resource"])
    reserved = GaugeMetricFamily("taichi_sandbox_node_reserved", "What running jobs reserve of the node's capacity",
                                 labels=["resource"])
    for resource in RESOURCES:
        used, total = state["node"][resource]
        if total is not None:
            capacity.add_metric([resource], total)
            reserved.add_metric([resource], used)
    tenant_reserved = GaugeMetricFamily("taichi_sandbox_tenant_reserved", "What a tenant's running jobs reserve "
                                        "(concurrency: jobs; memory, gpu_memory: bytes)", labels=["tenant", "resource"])
    tenant_quota = GaugeMetricFamily("taichi_sandbox_tenant_quota", "A tenant's quota, where it has one",
                                     labels=["tenant", "resource"])
    for tenant, row in state["tenants"].items():
        for resource in ("concurrency", "memory", "gpu_memory"):
            tenant_reserved.add_metric([tenant, resource], row[resource]["used"])
            if row[resource]["quota"] is not None:
                tenant_quota.add_metric([tenant, resource], row[resource]["quota"])
    memory = psutil.virtual_memory()
    total = GaugeMetricFamily("taichi_sandbox_node_memory_total_bytes", "The node's physical memory (MemTotal)",
                              value=memory.total)
    available = GaugeMetricFamily("taichi_sandbox_node_memory_available_bytes", "Memory the node has available "
                                  "now (MemAvailable), whoever uses the rest", value=memory.available)
    return [capacity, reserved, tenant_reserved, tenant_quota, total, available]


def job_gauges(jobs: Iterable[tuple[str, str, float, int | None]], now: float | None = None) -> list[GaugeMetricFamily]:
    """Gauges of the service's unfinished jobs, each (tenant, state, submitted, sampled memory or
    None): the memory running jobs use now, per tenant, and how long the oldest queued job has waited."""
    now = time.time() if now is None else now
    used: dict[str, float] = {}
    oldest = now
    for tenant, state, submitted, memory in jobs:
        if state == "running":
            used[tenant] = used.get(tenant, 0) + (memory or 0)
        elif state == "queued":
            oldest = min(oldest, submitted)
    memory_family = GaugeMetricFamily("taichi_sandbox_job_memory_bytes", "Memory running jobs use now (their "
                                      "last sample: the cgroup's charge, else RSS)", labels=["tenant"])
    for tenant, value in sorted(used.items()):
        memory_family.add_metric([tenant], value)
    wait = GaugeMetricFamily("taichi_sandbox_queue_oldest_wait_seconds", "How long the oldest queued job has "
                             "waited (0: none queued)", value=max(0.0, now - oldest))
    return [memory_family, wait]

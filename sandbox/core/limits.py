"""Limits and the limits.toml policy (defaults, profiles, tenants); the units are `units`.

Contract: every bad value raises `ConfigError` whose message is one line naming where the value came
from, the key and the value. Nothing here starts processes or touches the job.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .errors import ConfigError, closest, joined, no_such, problems
from .units import (GiB, MiB, Bytes, Count, PlausibleBytes, PlausibleSeconds, Quota, Seconds, parse_address_space,
                    bounded, duration, parse_duration, parse_gpu_memory, parse_rate, parse_size, positive)


_TENANT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")  # also a directory name


def read_file(path: str | os.PathLike, what: str, parse: Callable[[str], Any]) -> Any:
    """`parse(text of path)`; a missing, unreadable or unparsable file is a one-line ConfigError
    naming the file and `what` it should have been."""
    try:
        return parse(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read {what}: {err}") from None
    except ValueError as err:  # TOMLDecodeError, JSONDecodeError
        raise ConfigError(f"{path}: invalid {what}: {str(err).splitlines()[0]}") from None


def _key(name: str) -> str:
    """A TOML key as written in a file: bare when it can be, else quoted (always one line)."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


class _Strict(BaseModel):
    """Models whose construction errors are one-line `ConfigError`s."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            fields = problems(err, type(self))
            detail = joined(fields)
            raise ConfigError(f"{type(self).__name__}: {detail}", detail, fields) from None

    @classmethod
    def parse(cls, data: Any, source: str):
        """Validate `data` (a dict from TOML/JSON/CLI); errors name `source`."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a table, got {type(data).__name__}")
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err.detail}", err.detail, err.fields) from None


class Limits(_Strict):
    """Resource limits for one job. None means unlimited. Unset fields inherit when merged."""

    cpu_time: PlausibleSeconds = None
    wall_time: PlausibleSeconds = None
    memory: PlausibleBytes = None
    address_space: Annotated[Union[int, Literal["auto"], None], positive(parse_address_space)] = "auto"
    gpu_memory: Annotated[Union[int, float, None], positive(parse_gpu_memory)] = None
    max_processes: Count = None
    cpu_threads: Count = None
    max_output: Bytes = None
    max_open_files: Count = None
    max_file_size: Bytes = None
    max_result: Bytes = 64 * MiB  # bytes of a job's return value (its result files, see sandbox.job.results)
    disk: PlausibleBytes = None  # what the job holds on disk: its work dir (cache writes too), and its outputs
    network: Literal["none", "host"] = "none"
    grace: Annotated[float, bounded(parse_duration, "the SIGTERM -> SIGKILL delay", default=2.0)] = 2.0
    poll_interval: Annotated[float, bounded(positive(parse_duration).func, "how often usage is sampled")] = 0.05

    def above(self, ceiling: "Limits") -> list[str]:
        """Each limit of ours that is laxer than `ceiling`'s ("memory 2 GiB > 1 GiB"): unlimited
        where it has a bound, a higher bound, the host network where it has none, or a form that
        cannot be compared (a GPU fraction against bytes)."""
        found = []
        for name in ("cpu_time", "wall_time", "memory", "address_space", "gpu_memory", "max_processes",
                     "cpu_threads", "max_output", "max_open_files", "max_file_size", "disk", "grace",
                     "poll_interval"):
            mine, cap = getattr(self, name), getattr(ceiling, name)
            if cap is None or cap == "auto" or mine == cap:
                continue
            if name in ("address_space", "gpu_memory"):  # bytes with bytes, a fraction with a fraction
                comparable = type(mine) is type(cap)
            else:
                comparable = mine is not None
            if not comparable or mine > cap:
                found.append(f"{name} {_shown(name, mine)} > {_shown(name, cap)}")
        if self.network == "host" and ceiling.network == "none":
            found.append('network "host" > "none"')
        return found

    def merged(self, override: "Limits") -> "Limits":
        """These limits with every field explicitly set in `override` replacing ours."""
        changes = {name: getattr(override, name) for name in override.model_fields_set}
        merged = self.model_copy(update=changes)
        object.__setattr__(merged, "__pydantic_fields_set__", self.model_fields_set | set(changes))
        return merged


def _shown(name: str, value: Any) -> str:
    """A limit's value for people: bytes in MiB/GiB, seconds with "s", None as "unlimited"."""
    if value is None:
        return "unlimited"
    if isinstance(value, int) and name in ("memory", "address_space", "gpu_memory", "max_output", "max_file_size",
                                           "disk"):
        return f"{value / GiB:g} GiB" if value >= GiB else f"{value / MiB:g} MiB"
    if name in ("cpu_time", "wall_time", "grace", "poll_interval"):
        return duration(value)
    return str(value)


# Address space Taichi needs to initialise, per arch (see docs/containment.md):
# CPU maps a 1 GiB host pool chunk plus arenas, OpenBLAS buffers and 8 MiB thread stacks (~1.55 GiB
# after init, fails at 1.5 GiB); lavapipe Vulkan adds the LLVM/Mesa driver and host-backed "device"
# memory. CUDA reserves ~2x device memory of VA, so RLIMIT_AS is not usable there at all.
TAICHI_AS_FLOOR = {"cpu": 2 * GiB, "vulkan": 4 * GiB, "opengl": 4 * GiB}
AS_HEADROOM_WITHOUT_MEMORY_LIMIT = 8 * GiB


def address_space_for(limits: Limits, arch: str) -> tuple[int | None, str]:
    """The RLIMIT_AS to apply for `arch`, and a one-line note saying how it was chosen."""
    if arch == "cuda":
        return None, "off: CUDA reserves virtual ranges far beyond physical memory"
    floor = TAICHI_AS_FLOOR.get(arch, 4 * GiB)
    if limits.address_space == "auto":
        extra = limits.memory if limits.memory is not None else AS_HEADROOM_WITHOUT_MEMORY_LIMIT
        return floor + extra, f"auto: Taichi {arch} floor {floor // MiB} MiB + {extra // MiB} MiB"
    if limits.address_space is None:
        return None, "off: unlimited by configuration"
    note = "explicit"
    if limits.address_space < floor:
        note += f"; below the Taichi {arch} floor of {floor // MiB} MiB, ti.init may fail"
    return limits.address_space, note


Priority = Annotated[int, Field(ge=-1_000_000, le=1_000_000)]  # a class: strict between classes (sandbox.node.scheduling)
Percent = Annotated[float, Field(ge=0, le=100)]


def _cache_quota(value: Any) -> int:
    parsed = parse_size(value)
    if parsed is None:
        raise ValueError("the offline cache is always bounded: give a size (0 keeps nothing)")
    return parsed


CacheQuota = Annotated[int, BeforeValidator(_cache_quota)]  # bytes of kept kernels (sandbox.job.ticache)


class Tenant(_Strict):
    """A tenant: its profile, and quotas the executor enforces across its running and queued jobs."""

    profile: str | None = None
    priority: Priority = 0
    max_concurrent: Count = None
    memory_quota: Quota = None
    gpu_memory_quota: Quota = None
    rate: Annotated[Union[float, None], positive(parse_rate)] = None
    burst: Count = None
    max_queued: Count = None
    run_as: str | None = None  # a user name, "UID" or "UID:GID" (default: one from [sandbox] uid_range)
    users: list[Union[str, int]] = []  # who may submit as this tenant to the node service (names or uids)
    groups: list[Union[str, int]] = []  # ... or members of these groups (names or gids)
    cache_quota: Union[CacheQuota, None] = None  # None: [sandbox] cache_quota
    preemptible: bool = False  # its running jobs may be ended for a job of a higher priority (verdict `preempted`)
    requeue: bool = False  # ... and then go back to the queue instead of ending
    shares: Annotated[int, Field(ge=1)] = 1  # its fair share among tenants of its priority ([scheduler])


class JobType(_Strict):
    """A kind of job (training, inference, test, ...) with its own default profile and priority;
    `preemptible`/`requeue` true here make its jobs so whatever their tenant says (never the reverse)."""

    profile: str | None = None
    priority: Priority = 0
    preemptible: bool = False
    requeue: bool = False


class Scheduler(_Strict):
    """The `[scheduler]` table: the order of the queue within a priority class (sandbox.node.scheduling).
    A tenant's recent usage (`fair_share_usage`: the CPU-seconds its jobs used, or the memory they
    reserved × seconds) decays with `fair_share_half_life`; waiting adds up to `age_weight` (a fair-share
    factor is 0-1), reached after `max_age`."""

    fair_share_half_life: Annotated[float, positive(parse_duration)] = 3600.0
    fair_share_usage: Literal["cpu", "memory"] = "cpu"
    max_age: Annotated[float, positive(parse_duration)] = 600.0
    age_weight: Annotated[float, Field(ge=0, le=1000)] = 0.5


class Node(_Strict):
    """Declared capacity of this node (unset: what psutil (CPU, memory) and NVML (GPU) report), and
    what real memory admission and eviction ask for (sandbox.node.pressure)."""

    cpu_slots: Count = None
    memory: Bytes = None
    gpu_memory: Bytes = None
    memory_headroom: Quota = 512 * MiB  # a job starts when available memory covers its reservation + this
    memory_pressure_wait: Percent = 20.0  # ... and PSI memory `some avg10` (%) is at most this
    evict_available: Quota = 256 * MiB  # past either: the node is under pressure (eviction_due)
    evict_pressure: Percent = 60.0


class Cluster(_Strict):
    """The `[cluster]` table: the cluster-wide quota authority of Ray jobs (sandbox.ray). A job holds
    a lease on its tenant's share for as long as it runs; the node running it renews the lease every
    `lease_ttl` / 4 and ends the job itself when it could not renew for `lease_ttl` − min(`lease_ttl`
    / 2, grace + 6 s); the authority frees a lease only after max(`lease_ttl`, `lease_ttl` / 2 +
    grace + 6 s) without renewal (sandbox.ray.keeper)."""

    lease_ttl: Annotated[float, positive(parse_duration)] = 30.0
    in_flight: Count = 1000  # jobs a RayExecutor has submitted to Ray and not seen end, at most


class Alerts(_Strict):
    """Where alert events go besides the log and the audit log."""

    command: list[str] = []
    levels: list[float] = [0.8, 0.9]
    # A level that fired re-arms once usage fell below level - hysteresis and hold_down passed since.
    hysteresis: float = Field(0.1, ge=0, lt=1)
    hold_down: Annotated[float, BeforeValidator(parse_duration), Field(ge=0)] = 300.0


DEFAULT_ENV_ALLOW = (
    "PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_NUMERIC", "TZ", "TERM",
    "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
    "VK_ICD_FILENAMES", "VK_DRIVER_FILES", "MESA_LOADER_DRIVER_OVERRIDE", "LIBGL_ALWAYS_SOFTWARE",
)


class Settings(_Strict):
    """The `[sandbox]` table: where state goes and what reaches the job."""

    audit_log: str | None = None
    state_dir: str | None = None
    env_allow: list[str] = []
    launcher: Literal["forkserver", "exec"] = "forkserver"
    gpu_fallback_cpu: bool = False
    cgroups: Literal["auto", "off", "required"] = "auto"
    isolation: Literal["auto", "off", "required"] = "auto"
    rootfs: Literal["read-only", "writable"] = "read-only"  # in the job's mount namespace, beyond its own dirs
    syscall_filter: Literal["default", "off"] = "default"  # seccomp-bpf in every job (sandbox.job.syscalls)
    disk_images: Literal["auto", "off", "required"] = "auto"  # `disk` by a filesystem image per job, else polled
    uid_range: str = "60000-60999"
    allow_root: bool = False
    cache_quota: CacheQuota = 64 * MiB  # of each tenant's kept kernels (offline cache)

    def resolved_state_dir(self) -> Path:
        base = self.state_dir or os.path.join(
            os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "taichi-sandbox")
        return Path(base).expanduser()

    def resolved_audit_log(self) -> Path:
        return Path(self.audit_log).expanduser() if self.audit_log else self.resolved_state_dir() / "audit.jsonl"


def _metrics_address(value: Any) -> str | None:
    """HOST:PORT ([V6]:PORT for IPv6), PORT 0-65535 (0: any free port)."""
    if value is None:
        return None
    host, _, port = str(value).rpartition(":")
    if not host.strip("[]") or not port.isdigit() or int(port) > 65535:
        raise ValueError("give HOST:PORT, e.g. \"127.0.0.1:9464\" or \"[::1]:9464\"")
    return str(value)


class Service(_Strict):
    """The `[service]` table: the node service's socket, who may use it, and how it protects itself
    (see sandbox.node.service)."""

    socket: str | None = None  # default: /run/taichi-sandbox/sandbox.sock as root, else $XDG_RUNTIME_DIR
    group: str | None = None  # group owning the socket (mode 0660); default: the service's own
    operators_group: str | None = None  # its members see every tenant in `quota`, `ps` and `events`
    unknown_users: Literal["default", "refuse"] = "default"  # clients no tenant lists
    drain_timeout: Seconds = 30.0  # SIGTERM: running jobs may finish this long, then are cancelled
    max_connections_per_uid: Count = 16
    max_connections: Count = 512  # all uids together (each is a thread of the service)
    max_input_files_per_uid: Count = 1024  # descriptors of inputs held for a uid's unfinished jobs
    max_held_bytes_per_uid: Bytes = 256 * MiB  # requests of its unfinished jobs and results not read yet
    max_request_bytes: Bytes = 8 * MiB
    request_rate: Annotated[Union[float, None], positive(parse_rate)] = 50.0  # requests per uid
    request_burst: Count = 100
    request_timeout: Seconds = 10.0  # to send a whole request once it started
    idle_timeout: Seconds = 300.0  # between requests
    max_queued: Count = 20000  # jobs queued on the node, all tenants together
    metrics_port: Count = None  # Prometheus /metrics on 127.0.0.1:PORT
    metrics_address: Annotated[Union[str, None], BeforeValidator(_metrics_address)] = None  # HOST:PORT instead

    def metrics_endpoint(self) -> tuple[str, int] | None:
        """(host, port) of the /metrics endpoint: `metrics_address`, else 127.0.0.1:`metrics_port`, else None."""
        if self.metrics_address is not None:
            host, port = self.metrics_address.rsplit(":", 1)
            return host.strip("[]"), int(port)
        return None if self.metrics_port is None else ("127.0.0.1", self.metrics_port)


class Policy(BaseModel):
    """A parsed limits.toml: defaults, named profiles, tenants and sandbox settings."""

    model_config = ConfigDict(frozen=True)

    defaults: Limits = Limits()
    profiles: dict[str, Limits] = {}
    tenants: dict[str, Tenant] = {}
    job_types: dict[str, JobType] = {}
    node: Node = Node()
    alerts: Alerts = Alerts()
    settings: Settings = Settings()
    service: Service = Service()
    scheduler: Scheduler = Scheduler()
    cluster: Cluster = Cluster()
    source: str = "<built-in>"

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Policy":
        """Parse and validate a limits.toml. Raises ConfigError (one line) on any problem."""
        return cls.from_dict(read_file(path, "limits file", tomllib.loads), str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str) -> "Policy":
        known = {"defaults", "profiles", "tenants", "job_types", "node", "alerts", "sandbox", "service", "scheduler",
                 "cluster"}
        for key in data:
            if key not in known:
                close = closest(str(key), known)
                hint = f"did you mean [{close}]? " if close else ""
                raise ConfigError(f"{source}: unknown table [{_key(key)}] ({hint}known: {', '.join(sorted(known))})")
        for table in ("profiles", "tenants", "job_types"):
            if not isinstance(data.get(table, {}), dict):
                raise ConfigError(f"{source}: [{table}] must be a table of tables")
            for name, body in data.get(table, {}).items():
                if not isinstance(body, dict):
                    raise ConfigError(f"{source}: [{table}.{_key(name)}] must be a table")
        defaults = Limits.parse(data.get("defaults", {}), f"{source} [defaults]")
        profiles = {name: defaults.merged(Limits.parse(body, f"{source} [profiles.{_key(name)}]"))
                    for name, body in data.get("profiles", {}).items()}
        for name in data.get("tenants", {}):
            if not _TENANT_NAME.fullmatch(name):
                raise ConfigError(f"{source} [tenants.{_key(name)}]: invalid tenant name (letters, digits, '_', '-', '.'; "
                                  "not starting with '.')")
        tenants = {name: Tenant.parse(body, f"{source} [tenants.{name}]")
                   for name, body in data.get("tenants", {}).items()}
        job_types = {name: JobType.parse(body, f"{source} [job_types.{_key(name)}]")
                     for name, body in data.get("job_types", {}).items()}
        for table, entries in (("tenants", tenants), ("job_types", job_types)):
            for name, entry in entries.items():
                if entry.profile is not None and entry.profile not in profiles:
                    raise ConfigError(f"{source} [{table}.{_key(name)}]: {no_such('profile', entry.profile, profiles)}")
        return cls(defaults=defaults, profiles=profiles, tenants=tenants, job_types=job_types,
                   node=Node.parse(data.get("node", {}), f"{source} [node]"),
                   alerts=Alerts.parse(data.get("alerts", {}), f"{source} [alerts]"),
                   settings=Settings.parse(data.get("sandbox", {}), f"{source} [sandbox]"),
                   service=Service.parse(data.get("service", {}), f"{source} [service]"),
                   scheduler=Scheduler.parse(data.get("scheduler", {}), f"{source} [scheduler]"),
                   cluster=Cluster.parse(data.get("cluster", {}), f"{source} [cluster]"), source=source)

    def cache_quota(self, tenant: str | None) -> int:
        """Bytes of compiled kernels kept for `tenant`: its own `cache_quota`, else `[sandbox]`'s."""
        entry = self.tenants.get(tenant) if tenant is not None else None
        own = entry.cache_quota if entry is not None else None
        return own if own is not None else self.settings.cache_quota

    def priority(self, tenant: str | None, job_type: str | None, priority: int | None = None) -> int:
        """A job's priority: its own, else its job type's, else its tenant's (0 for an unknown name)."""
        if priority is not None:
            return priority
        if job_type is not None and job_type in self.job_types:
            return self.job_types[job_type].priority
        return self.tenants[tenant].priority if tenant in self.tenants else 0

    def resolve(self, profile: str | None = None, tenant: str | None = None,
                overrides: Limits | None = None, job_type: str | None = None) -> Limits:
        """Limits for a job: the profile (explicit, else the job type's, else the tenant's, else
        defaults), then overrides. A tenant's own profile (else the defaults) is its ceiling: a job
        may lower any limit, never raise one past it (ConfigError naming each)."""
        if tenant is not None and tenant not in self.tenants:
            raise ConfigError(f"{self.source}: {no_such('tenant', tenant, self.tenants)}")
        if job_type is not None and job_type not in self.job_types:
            raise ConfigError(f"{self.source}: {no_such('job_type', job_type, self.job_types)}")
        if profile is None and job_type is not None:
            profile = self.job_types[job_type].profile
        if profile is None and tenant is not None:
            profile = self.tenants[tenant].profile
        if profile is None:
            base = self.defaults
        elif profile in self.profiles:
            base = self.profiles[profile]
        else:
            raise ConfigError(f"{self.source}: {no_such('profile', profile, self.profiles)}")
        limits = base.merged(overrides) if overrides is not None else base
        if tenant is not None:
            own = self.tenants[tenant].profile
            above = limits.above(self.profiles[own] if own in self.profiles else self.defaults)
            if above:
                raise ConfigError(f"tenant {tenant!r} may lower its limits, not raise them past its profile "
                                  f"({own or '[defaults]'}): {'; '.join(above)}")
        return limits


BUNDLED_POLICY = Path(__file__).parent.parent / "limits.toml"  # the repository's limits.toml, shipped as package data


def default_policy_path() -> Path | None:
    """$TAICHI_SANDBOX_LIMITS, else ./limits.toml when present, else the bundled limits.toml (None only
    when an install lacks it: then nothing is limited)."""
    env = os.environ.get("TAICHI_SANDBOX_LIMITS")
    if env:
        return Path(env)
    local = Path("limits.toml")
    if local.is_file():
        return local
    return BUNDLED_POLICY if BUNDLED_POLICY.is_file() else None


def load_policy(path: str | os.PathLike | None = None) -> Policy:
    """The policy at `path`, or the default one (see `default_policy_path`)."""
    path = path if path is not None else default_policy_path()
    return Policy.load(path) if path is not None else Policy()

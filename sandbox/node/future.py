"""JobFuture: the Future[JobResult] SandboxExecutor hands out, holding the job's JobControl (one per
run: a preempted job that is requeued gets a new one) and what must carry over between runs."""

from __future__ import annotations

from concurrent.futures import Future

from ..core.models import JobSpec
from ..watch.echo import Echo
from ..watch.monitor import JobControl

DEFAULT_TENANT = "_default"


class JobFuture(Future):
    """A Future[JobResult]. `cancel()` on a queued job cancels it (CancelledError, as usual); on a
    running job it asks the supervisor to end it and returns True: the result is verdict `cancelled`.
    `echo`: what shows the job's output while it runs (None: nothing, `quiet`)."""

    def __init__(self, spec: JobSpec, quiet: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.echo = None if quiet else Echo()
        self.control = JobControl()  # the current run's (a requeued job gets a new one)
        self.tenant = spec.tenant or DEFAULT_TENANT
        self.waiting: str | None = None  # why it waits in the queue though it fits the reservations
        self.cancel_asked = False  # a running (or requeued) job was asked to end
        self._lease: tuple[float | None, str | None] = (None, None)  # (deadline, why it was lost)

    def cancel(self) -> bool:
        if super().cancel():
            return True
        if self.running():
            self.cancel_asked = True
            self.control.cancel()
            return True
        return False

    def lease(self, deadline: float | None = None, lost: str | None = None) -> None:
        """The job's cluster lease, set or extended to `deadline` (time.monotonic()), or `lost` (see
        JobControl.lease_until and lease_lost); kept for its next run should it be requeued."""
        if self._lease[1] is not None:
            return  # once lost, it stays lost
        self._lease = (deadline, None) if lost is None else (self._lease[0], lost)
        self._apply_lease(self.control)

    def rerun(self) -> None:
        """A new control for the job's next run (it was preempted and requeued), with its lease."""
        self.control = JobControl()
        self._apply_lease(self.control)

    def _apply_lease(self, control: JobControl) -> None:
        deadline, lost = self._lease
        if lost is not None:
            control.lease_lost(lost)
        elif deadline is not None:
            control.lease_until(deadline)

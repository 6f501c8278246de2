"""Start translated compose services (:mod:`local_compose`) as processes, in dependency order.

:class:`LocalProject` starts each service once its ``depends_on`` conditions hold, like
``docker compose up`` does, then waits for them all to exit. Each process writes its output to
``<logs_dir>/<service>.log`` and runs in its own process group, which :meth:`LocalProject.stop`
ends (SIGTERM, then SIGKILL after a grace period). Health checks are polled while waiting on the
service's own process, so a service that dies is reported at once, with its log's tail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from local_compose import ComposeError, LocalService, start_order

LOG_TAIL_CHARS = 3000


class LocalProject:
    """A set of :class:`LocalService` run as local processes (use as a context manager)."""

    def __init__(
        self,
        services: Mapping[str, LocalService],
        logs_dir: Path,
        *,
        base_environment: Mapping[str, str] | None = None,
        poll_s: float = 0.25,
        grace_s: float = 20.0,
    ) -> None:
        self.services = dict(services)
        self.order = start_order(self.services)
        self.logs_dir = logs_dir
        self.poll_s = poll_s
        self.grace_s = grace_s
        base = os.environ if base_environment is None else base_environment
        self.base_environment = {k: v for k, v in base.items() if not k.startswith("FEDROT_")}
        self.processes: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> LocalProject:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    def environment_of(self, name: str) -> dict[str, str]:
        return {**self.base_environment, **self.services[name].environment}

    def log(self, name: str) -> str:
        path = self.logs_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, name: str) -> str:
        return f"--- {name}.log (tail) ---\n{self.log(name)[-LOG_TAIL_CHARS:]}"

    def start(self, timeout_s: float) -> None:
        """Start every service in order; each waits for its dependencies' conditions."""
        deadline = time.monotonic() + timeout_s
        for name in self.order:
            for dependency, condition in sorted(self.services[name].depends_on.items()):
                self.await_condition(dependency, condition, deadline, waiting=name)
            self.spawn(name)

    def spawn(self, name: str) -> subprocess.Popen:
        service = self.services[name]
        workdir = self.logs_dir / "work" / name
        workdir.mkdir(parents=True, exist_ok=True)
        with (self.logs_dir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                service.argv,
                env=self.environment_of(name),
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes[name] = process
        return process

    def await_condition(self, name: str, condition: str, deadline: float, waiting: str) -> None:
        """Block until ``name`` satisfies ``condition`` (a compose ``depends_on`` condition)."""
        if condition == "service_completed_successfully":
            code = self.wait_exit(name, deadline)
            if code != 0:
                raise ComposeError(
                    f"{waiting} needs {name} to complete successfully; it exited "
                    f"{code}\n{self.log_tail(name)}"
                )
        elif condition == "service_healthy":
            self.await_healthy(name, deadline, waiting)

    def wait_exit(self, name: str, deadline: float) -> int:
        try:
            return self.processes[name].wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise ComposeError(f"{name} did not exit in time\n{self.log_tail(name)}") from None

    def await_healthy(self, name: str, deadline: float, waiting: str) -> None:
        """Run ``name``'s healthcheck until it passes, while watching its process."""
        check = self.services[name].healthcheck
        if check is None:
            raise ComposeError(
                f"{waiting} waits for {name} to be healthy; {name} has no healthcheck"
            )
        process = self.processes[name]
        while True:
            if process.poll() is not None:
                raise ComposeError(
                    f"{name} exited {process.returncode} before it was healthy\n"
                    f"{self.log_tail(name)}"
                )
            try:
                probe = subprocess.run(
                    check.argv,
                    env=self.environment_of(name),
                    capture_output=True,
                    timeout=check.timeout_s,
                    check=False,
                )
                if probe.returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise ComposeError(f"{name} was not healthy in time\n{self.log_tail(name)}")
            try:  # the pause between probes, cut short if the service dies
                process.wait(timeout=min(check.interval_s, self.poll_s))
            except subprocess.TimeoutExpired:
                pass

    def wait_all(self, timeout_s: float) -> dict[str, int]:
        """Wait until every started service exits; their exit codes by name."""
        deadline = time.monotonic() + timeout_s
        try:
            return {name: self.wait_exit(name, deadline) for name in list(self.processes)}
        except ComposeError:
            running = [n for n, p in self.processes.items() if p.poll() is None]
            tails = "\n".join(self.log_tail(name) for name in running)
            raise ComposeError(f"still running after {timeout_s}s: {running}\n{tails}") from None

    def stop(self) -> None:
        """SIGTERM every process group still running, then SIGKILL what outlives the grace."""
        running = [p for p in self.processes.values() if p.poll() is None]
        for process in running:
            signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                signal_group(process, signal.SIGKILL)
                process.wait()


def signal_group(process: subprocess.Popen, number: int) -> None:
    """Send ``number`` to the process group this module started for ``process``."""
    try:
        os.killpg(process.pid, number)
    except ProcessLookupError:
        pass

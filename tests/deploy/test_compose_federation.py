"""docker-compose.yml as a working federation: its services' commands, environments and
dependency order run as local processes (local_compose + compose_runner), with the real
secrets-init step, the real fedrot-server and three real fedrot-client daemons; once as it is,
once with the TLS overlay (deploy/compose.tls.yml: its tls-init step makes the certificates).

Only the run's size differs from ``docker compose up``: the settings file (the compose variable
``FEDROT_SETTINGS_FILE``) is deploy/server.toml with the tiny seeded BERT instead of MiniLM,
2 rounds and a few local steps, and the data step keeps a few dozen glosses per client. No
``.env``: the variables are those of ``.env.example`` (every one a default) and free ports.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from fedrot.codec import decode_adapter

from compose_runner import LocalProject
from local_compose import free_port_values, read_env_file, resolve_compose, translate_project

pytest.importorskip(
    "fedrot_client.daemon",
    reason="the client daemon (fedrot_client.daemon) is not written yet: the compose "
    "federation has no client to run",
)
pytest.importorskip("fedrot_server.main", reason="the server entry point is not written yet")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WORDNET = Path("/usr/share/wordnet/data.noun")
ROUNDS = 2


def tiny_settings(folder: Path) -> Path:
    """deploy/server.toml, shrunk: tiny-bert, ``ROUNDS`` rounds, 3 local steps (as JSON)."""
    settings = tomllib.loads((REPO / "deploy" / "server.toml").read_text())
    settings["rounds"] = ROUNDS
    settings["model"]["name"] = "tiny-bert"
    settings["lora"] = {**settings["lora"], "rank": 2, "alpha": 4.0}
    settings["training"] = {
        **settings["training"],
        "local_steps": 3,
        "batch_size": 8,
        "max_length": 32,
    }
    settings["linger_s"] = 30.0
    path = folder / "server-settings.json"
    path.write_text(json.dumps(settings))
    return path


PROGRAMS = {  # what the images install in /usr/local/bin
    "fedrot-healthcheck": (sys.executable, str(REPO / "deploy" / "healthcheck.py")),
    "fedrot-secrets-init": (sys.executable, str(REPO / "deploy" / "secrets_init.py")),
    "fedrot-tls-init": (sys.executable, str(REPO / "deploy" / "tls_init.py")),
}
TLS_FILES = ("docker-compose.yml", "deploy/compose.tls.yml")


@pytest.mark.skipif(
    not WORDNET.exists(), reason="needs Debian's wordnet-base (make test installs it)"
)
@pytest.mark.parametrize("files", [(), TLS_FILES], ids=["plaintext", "tls"])
def test_docker_compose_services_form_a_working_federation(
    tmp_path: Path, files: tuple[str, ...]
) -> None:
    values = read_env_file(REPO / ".env.example")
    values.update(free_port_values(values))
    values.update(
        FEDROT_SETTINGS_FILE=str(tiny_settings(tmp_path)),
        FEDROT_DATA_MAX_PER_CLIENT="40",
        FEDROT_DATA_EVAL_SIZE="24",
    )
    volumes = tmp_path / "volumes"
    services = translate_project(resolve_compose(REPO, values, files), volumes, PROGRAMS)

    with LocalProject(services, tmp_path / "logs") as project:
        project.start(timeout_s=300)
        codes = project.wait_all(timeout_s=240)
        logs = "\n".join(project.log_tail(name) for name in services)
        full_logs = "\n".join(project.log(name) for name in services)
    assert codes == {name: 0 for name in services}, logs

    secrets = generated_secrets(volumes)
    for secret in secrets:
        assert secret not in full_logs, "a token was written to a log"
    if files:  # the clients (and the server's health check) spoke TLS, or nothing worked
        server_env = services["server"].environment
        assert server_env["FEDROT_SERVER_TLS_CERT_FILE"].startswith(str(volumes))
        for index in range(3):
            assert "FEDROT_CLIENT_TLS_CA_FILE" in services[f"client-{index}"].environment
        assert sorted(p.name for p in (volumes / "tls-ca").iterdir()) == ["ca.pem"]

    assert sorted(p.name for p in (volumes / "data").glob("client-*.jsonl")) == [
        "client-0.jsonl",
        "client-1.jsonl",
        "client-2.jsonl",
    ]
    runs = list((volumes / "server-state" / "runs").iterdir())
    assert len(runs) == 1, logs
    rounds = sorted((runs[0] / "rounds").iterdir(), key=lambda p: int(p.name))
    assert len(rounds) == ROUNDS, [p.name for p in rounds]
    final = rounds[-1] / "adapter"
    assert (final / "adapter_config.json").is_file() and (
        final / "adapter_model.safetensors"
    ).is_file()
    for index in range(3):  # every client kept the run's final adapter (FINAL_ADAPTER_DIR)
        saved = volumes / f"client-{index}-state" / "final-adapter"
        kept = decode_adapter((saved / "adapter_model.safetensors").read_bytes()).tensors
        served = decode_adapter((final / "adapter_model.safetensors").read_bytes()).tensors
        assert kept.keys() == served.keys()
        assert all(torch.equal(kept[key], served[key]) for key in served)


def generated_secrets(volumes: Path) -> list[str]:
    """The tokens secrets-init made: three clients, each volume holding its own token only,
    an admin token and a dashboard read token, all different."""
    folder = volumes / "secrets"
    tokens = dict(line.split("=", 1) for line in (folder / "tokens").read_text().splitlines())
    assert sorted(tokens) == ["client-0", "client-1", "client-2"]
    for name, token in tokens.items():
        assert [p.name for p in (volumes / f"{name}-token").iterdir()] == ["token"]
        assert (volumes / f"{name}-token" / "token").read_text() == token + "\n"
    singles = [(folder / n).read_text().strip() for n in ("admin-token", "dashboard-read-token")]
    secrets = [*tokens.values(), *singles]
    assert len(set(secrets)) == len(secrets) and all(len(s) >= 32 for s in secrets)
    return secrets

"""The deployment files, checked offline: the Compose CLI resolves docker-compose.yml, hadolint
passes every Dockerfile, every Kubernetes manifest validates against its schema, and the files
agree with each other and with the code (settings, packages, tokens)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
K8S = REPO / "deploy" / "k8s"
DOCKERFILES = sorted(REPO.glob("deploy/**/*Dockerfile")) + sorted(
    REPO.glob("deploy/**/Dockerfile.*")
)
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is not installed in {BIN}: run `make venv` (the dev extra)"
    return str(path)


def compose(*args: str, env_file: Path = REPO / ".env.example") -> subprocess.CompletedProcess:
    environ = {"PATH": "/usr/bin:/bin", "HOME": str(REPO)}
    return subprocess.run(
        [tool("docker-compose"), "--env-file", str(env_file), *args],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    "files", [[], ["-f", "docker-compose.yml", "-f", "deploy/compose.gpu.yml"]]
)
def test_compose_config_is_valid(files: list[str]) -> None:
    done = compose(*files, "config", "-q")
    assert done.returncode == 0, done.stderr


def test_compose_refuses_to_start_without_the_tokens(tmp_path: Path) -> None:
    lines = (REPO / ".env.example").read_text().splitlines()
    env_file = tmp_path / "partial.env"
    env_file.write_text("\n".join(x for x in lines if not x.startswith("FEDROT_TOKEN_CLIENT_1=")))
    done = compose("config", "-q", env_file=env_file)
    assert done.returncode != 0
    assert "FEDROT_TOKEN_CLIENT_1" in done.stderr and "set it in .env" in done.stderr


def test_the_gpu_override_reserves_a_gpu_for_the_server() -> None:
    done = compose(
        "-f", "docker-compose.yml", "-f", "deploy/compose.gpu.yml", "config", "--format", "json"
    )
    assert done.returncode == 0, done.stderr
    server = yaml.safe_load(done.stdout)["services"]["server"]
    devices = server["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["capabilities"] == ["gpu"]


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


def test_dockerignore_lets_in_every_package_folder_and_the_healthcheck() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    folders = {path.split("/")[0] for path in project["tool"]["setuptools"]["package-dir"].values()}
    needed = folders | {"pyproject.toml", project["project"]["readme"], "deploy/healthcheck.py"}
    assert needed <= allowed, f"missing from .dockerignore's allow list: {sorted(needed - allowed)}"


def test_there_are_manifests_for_the_server_and_the_clients() -> None:
    kinds = {
        doc["kind"] for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc
    }
    assert {"StatefulSet", "Service", "Secret", "ConfigMap", "Job"} <= kinds


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifest_validates_against_its_schema(manifest: Path) -> None:
    done = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def load_manifest(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def test_kustomization_lists_every_manifest_and_both_images() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in MANIFESTS)
    used = {
        c["image"].split(":")[0]
        for path in MANIFESTS
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] in ("StatefulSet", "Job")
        for c in doc["spec"]["template"]["spec"]["containers"]
        + doc["spec"]["template"]["spec"].get("initContainers", [])
    }
    assert (
        used
        == {image["name"] for image in kustomization["images"]}
        == {"fedrot-server", "fedrot-client"}
    )


def test_the_configmap_carries_deploy_server_toml() -> None:
    (config,) = load_manifest("server-config.yaml")
    assert config["data"]["server.toml"] == (REPO / "deploy" / "server.toml").read_text()


def test_server_toml_is_valid_server_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings_module = pytest.importorskip("fedrot_server.settings")
    from fedrot_client.wordnet import LEXNAMES

    monkeypatch.setenv("FEDROT_SERVER_TOKENS", '{"client-0": "a-token-of-twenty-chars"}')
    settings = settings_module.load_settings(["--config", str(REPO / "deploy" / "server.toml")])
    assert settings.model.name == "minilm"
    assert settings.model.num_labels == len(LEXNAMES)
    assert tuple(settings.evaluation.labels) == LEXNAMES


def test_tokens_secret_matches_the_client_job() -> None:
    (secret,) = load_manifest("tokens-secret.yaml")
    (job,) = load_manifest("clients-job.yaml")
    data = secret["stringData"]
    server_list = dict(line.split("=", 1) for line in data["tokens"].splitlines() if line.strip())
    clients = {key: value for key, value in data.items() if key.startswith("client-")}
    assert clients == server_list
    assert set(data) == {"tokens", "admin-token", *clients}
    assert data["admin-token"] not in clients.values()
    assert sorted(clients) == [f"client-{i}" for i in range(job["spec"]["completions"])]
    assert len(set(clients.values())) == len(clients)
    toml = tomllib.loads((REPO / "deploy" / "server.toml").read_text())
    assert toml["min_clients"] <= job["spec"]["completions"]


def test_job_env_defines_the_client_index_before_using_it() -> None:
    (job,) = load_manifest("clients-job.yaml")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    names = [env["name"] for env in container["env"]]
    for position, env in enumerate(container["env"]):
        if "$(CLIENT_INDEX)" in env.get("value", ""):
            assert names.index("CLIENT_INDEX") < position, env["name"]


def test_every_data_step_builds_the_same_split() -> None:
    """Held-out and training files must come from one split: the server's and the clients' init
    containers and the compose data step run the same command."""
    (server,) = load_manifest("server-statefulset.yaml")
    (job,) = load_manifest("clients-job.yaml")
    commands = [
        doc["spec"]["template"]["spec"]["initContainers"][0]["command"] for doc in (server, job)
    ]
    done = compose("config", "--format", "json")
    assert done.returncode == 0, done.stderr
    commands.append(yaml.safe_load(done.stdout)["services"]["prepare-data"]["command"])
    assert commands[0][:3] == ["python", "-m", "fedrot_client.wordnet"]
    assert commands[0] == commands[1] == commands[2]


def documented_statefulset_patches() -> list[dict]:
    """The JSON-patch operations that docs/deploy.md suggests for the server's StatefulSet."""
    text = (REPO / "docs" / "deploy.md").read_text()
    fenced = text.split("```")[1::2]
    blocks = [block.split("\n", 1)[1] for block in fenced if block.startswith("yaml")]
    operations = []
    for block in blocks:
        for patch in (yaml.safe_load(block) or {}).get("patches", []):
            if patch["target"] == {"kind": "StatefulSet", "name": "fedrot-server"}:
                operations.extend(yaml.safe_load(patch["patch"]))
    return operations


def resolve(document: object, pointer: str) -> object:
    """The node a JSON pointer names; KeyError/IndexError when it names nothing."""
    for token in pointer.lstrip("/").split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(document, list):
            document = document[int(token)]
        else:
            document = document[token]  # type: ignore[index]
    return document


def test_the_documented_patches_point_at_what_they_mean() -> None:
    (server,) = load_manifest("server-statefulset.yaml")
    operations = documented_statefulset_patches()
    assert {op["path"].rsplit("/", 1)[-1] for op in operations} >= {
        "readinessProbe", "livenessProbe", "startupProbe", "nvidia.com~1gpu", "value"}  # fmt: skip
    for op in operations:
        parent, _, last = op["path"].rpartition("/")
        assert isinstance(resolve(server, parent), dict | list), op
        if op["op"] == "replace":
            resolve(server, op["path"])  # replace needs an existing node
    device = [op for op in operations if op["path"].endswith("/value") and "/env/" in op["path"]]
    assert [resolve(server, op["path"].rsplit("/", 1)[0])["name"] for op in device] == [
        "FEDROT_SERVER_DEVICE"]  # fmt: skip
    assert resolve(server, "/spec/template/spec/containers/0/name") == "server"

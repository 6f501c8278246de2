"""deploy/k8s and deploy/k8s-tls, checked offline: every manifest validates against its schema
(kubernetes-validate), the Secrets come from the documented commands and mount by their keys,
the TLS overlay's patches apply and validate, and the manifests agree with deploy/server.toml,
docker-compose.yml and docs/deploy.md. With kubectl installed, kustomize renders both."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from deploy_tools import REPO, compose, validate_kubernetes

K8S = REPO / "deploy" / "k8s"
K8S_TLS = REPO / "deploy" / "k8s-tls"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_there_are_manifests_for_the_server_and_the_clients() -> None:
    kinds = {
        doc["kind"] for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc
    }
    assert {"StatefulSet", "Service", "ConfigMap", "Job"} <= kinds
    assert "Secret" not in kinds, "Secrets are generated (kustomization.yaml), never committed"


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifest_validates_against_its_schema(manifest: Path) -> None:
    done = validate_kubernetes(manifest)
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
    assert tuple(settings.model.labels) == LEXNAMES and not settings.evaluation.labels


def documented_command(kustomization: Path, script: str) -> list[str]:
    """The ``python3 deploy/<script> ...`` command that a kustomization's comment documents."""
    lines = [line.lstrip("#").strip() for line in kustomization.read_text().splitlines()]
    first = next(i for i, line in enumerate(lines) if line.startswith(f"python3 deploy/{script}"))
    text = ""
    for line in lines[first:]:
        text += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            break
    return text.split()


@pytest.fixture(scope="module")
def generated_k8s(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/ whose k8s Secrets' files were made by the documented commands."""
    root = tmp_path_factory.mktemp("k8s-copy")
    generated = shutil.ignore_patterns("secrets", "certs")  # what the commands make
    shutil.copytree(REPO / "deploy", root / "deploy", ignore=generated)
    for kustomization, script in ((K8S, "secrets_init.py"), (K8S_TLS, "tls_init.py")):
        command = documented_command(kustomization / "kustomization.yaml", script)
        done = subprocess.run([sys.executable, *command[1:]], cwd=root, capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr
    return root


def generator_files(kustomization: Path) -> dict[str, dict[str, Path]]:
    """Secret name -> key -> file, of a kustomization's secretGenerator."""
    spec = yaml.safe_load(kustomization.read_text())
    return {
        generator["name"]: {
            key: kustomization.parent / path
            for key, _, path in (entry.partition("=") for entry in generator["files"])
        }
        for generator in spec["secretGenerator"]
    }


def test_the_documented_commands_make_every_file_the_secrets_need(generated_k8s: Path) -> None:
    for folder in ("k8s", "k8s-tls"):
        generators = generator_files(generated_k8s / "deploy" / folder / "kustomization.yaml")
        for name, files in generators.items():
            for key, path in files.items():
                assert path.is_file(), f"{folder}: secret {name} key {key}: no {path}"
    server = generator_files(generated_k8s / "deploy" / "k8s" / "kustomization.yaml")
    secrets_dir = generated_k8s / "deploy" / "k8s" / "secrets"
    lines = (secrets_dir / "server" / "tokens").read_text().split()
    tokens = dict(line.split("=", 1) for line in lines)
    clients = server["fedrot-client-tokens"]
    assert {key: path.read_text().strip() for key, path in clients.items()} == tokens
    values = [*tokens.values(), *(server["fedrot-server-secrets"][k].read_text().strip()
                                  for k in ("admin-token", "dashboard-read-token"))]  # fmt: skip
    assert len(set(values)) == len(values)


def test_the_pods_mount_the_generated_secrets_by_their_keys() -> None:
    generators = generator_files(K8S / "kustomization.yaml")
    (server,) = load_manifest("server-statefulset.yaml")
    (job,) = load_manifest("clients-job.yaml")
    assert secret_volumes(server) == {"/etc/fedrot/secrets": "fedrot-server-secrets"}
    clients_see = {"/etc/fedrot/tokens": "fedrot-client-tokens"}  # no admin or read token
    assert secret_volumes(job) == clients_see
    (container,) = server["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    files = {k: v for k, v in env.items() if k.endswith("TOKENS_FILE") or k.endswith("TOKEN_FILE")}
    assert set(files) == {"FEDROT_SERVER_TOKENS_FILE", "FEDROT_SERVER_ADMIN_TOKEN_FILE",
                          "FEDROT_SERVER_DASHBOARD_READ_TOKEN_FILE"}  # fmt: skip
    for value in files.values():
        folder, _, key = value.rpartition("/")
        assert folder == "/etc/fedrot/secrets" and key in generators["fedrot-server-secrets"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    token_file = env["FEDROT_CLIENT_TOKEN_FILE"]
    keys = {token_file.rpartition("/")[2].replace("$(CLIENT_INDEX)", str(i))
            for i in range(job["spec"]["completions"])}  # fmt: skip
    assert keys == set(generators["fedrot-client-tokens"])
    toml = tomllib.loads((REPO / "deploy" / "server.toml").read_text())
    assert toml["min_clients"] <= job["spec"]["completions"]


def secret_volumes(workload: dict) -> dict[str, str]:
    """mount path -> Secret name, for the Secret volumes of a workload's first container."""
    spec = workload["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    mounts = spec["containers"][0]["volumeMounts"]
    return {m["mountPath"]: secrets[m["name"]] for m in mounts if m["name"] in secrets}


def json_patch(document: dict, operations: list[dict]) -> dict:
    """RFC 6902 add / replace / remove (what the overlays use) on a copy of ``document``."""
    document = yaml.safe_load(yaml.safe_dump(document))
    for op in operations:
        parent_path, _, last = op["path"].rpartition("/")
        parent = resolve(document, parent_path) if parent_path else document
        key: int | str = last.replace("~1", "/").replace("~0", "~")
        if isinstance(parent, list):
            key = len(parent) if key == "-" else int(key)
        if op["op"] == "add" and isinstance(parent, list):
            parent.insert(key, op["value"])  # type: ignore[arg-type]
        elif op["op"] in ("add", "replace"):
            if op["op"] == "replace":
                parent[key]  # type: ignore[index]  # replace needs an existing node
            parent[key] = op["value"]  # type: ignore[index]
        elif op["op"] == "remove":
            del parent[key]  # type: ignore[arg-type]
        else:
            raise AssertionError(f"unexpected op {op}")
    return document


def tls_patched() -> dict[str, dict]:
    """The manifests the TLS overlay patches, patched as its kustomization says."""
    spec = yaml.safe_load((K8S_TLS / "kustomization.yaml").read_text())
    targets = {"StatefulSet": "server-statefulset.yaml", "Job": "clients-job.yaml",
               "Service": "server-service.yaml"}  # fmt: skip
    patched = {}
    for patch in spec["patches"]:
        docs = [d for d in load_manifest(targets[patch["target"]["kind"]])
                if d["metadata"]["name"] == patch["target"]["name"]]  # fmt: skip
        (document,) = docs
        operations = yaml.safe_load((K8S_TLS / patch["path"]).read_text())
        patched[patch["target"]["kind"]] = json_patch(document, operations)
    return patched


def test_the_tls_overlay_patches_validate_and_wire_the_certificates(tmp_path: Path) -> None:
    patched = tls_patched()
    assert set(patched) == {"StatefulSet", "Job", "Service"}
    for kind, document in patched.items():
        path = tmp_path / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(document))
        done = validate_kubernetes(path)
        assert done.returncode == 0, done.stdout + done.stderr
    generators = generator_files(K8S_TLS / "kustomization.yaml")
    server = patched["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in server["env"]}
    mounts = secret_volumes(patched["StatefulSet"])
    assert mounts["/etc/fedrot/tls"] == "fedrot-server-tls"
    for name in ("FEDROT_SERVER_TLS_CERT_FILE", "FEDROT_SERVER_TLS_KEY_FILE",
                 "FEDROT_HEALTHCHECK_TLS_CA_FILE"):  # fmt: skip
        folder, _, key = env[name].rpartition("/")
        assert folder == "/etc/fedrot/tls" and key in generators["fedrot-server-tls"], name
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # no plaintext grpc probe
        assert server[probe]["exec"]["command"] == ["fedrot-healthcheck", "--role", "server"]
    client = patched["Job"]["spec"]["template"]["spec"]["containers"][0]
    ca_file = next(e["value"] for e in client["env"] if e["name"] == "FEDROT_CLIENT_TLS_CA_FILE")
    assert secret_volumes(patched["Job"])[ca_file.rpartition("/")[0]] == "fedrot-tls-ca"
    assert set(generators["fedrot-tls-ca"]) == {ca_file.rpartition("/")[2]}
    assert "appProtocol" not in patched["Service"]["spec"]["ports"][0]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (its kustomize)")
@pytest.mark.parametrize("folder", ["k8s", "k8s-tls"])
def test_kustomize_renders_valid_manifests(
    generated_k8s: Path, folder: str, tmp_path: Path
) -> None:
    done = subprocess.run(["kubectl", "kustomize", str(generated_k8s / "deploy" / folder)],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(done.stdout)
    done = validate_kubernetes(rendered)
    assert done.returncode == 0, done.stdout + done.stderr
    kinds = [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(rendered.read_text())]
    secrets = {name for kind, name in kinds if kind == "Secret"}
    expected = {"fedrot-server-secrets", "fedrot-client-tokens"}
    if folder == "k8s-tls":
        expected |= {"fedrot-server-tls", "fedrot-tls-ca"}
    assert secrets == expected


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
    assert {op["path"].rsplit("/", 1)[-1] for op in operations} >= {"nvidia.com~1gpu", "value"}
    for op in operations:
        parent, _, last = op["path"].rpartition("/")
        assert isinstance(resolve(server, parent), dict | list), op
        if op["op"] == "replace":
            resolve(server, op["path"])  # replace needs an existing node
    device = [op for op in operations if op["path"].endswith("/value") and "/env/" in op["path"]]
    assert [resolve(server, op["path"].rsplit("/", 1)[0])["name"] for op in device] == [
        "FEDROT_SERVER_DEVICE"]  # fmt: skip
    assert resolve(server, "/spec/template/spec/containers/0/name") == "server"

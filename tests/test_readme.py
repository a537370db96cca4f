"""The README and the code must not drift: settings and their defaults, error codes, commands."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.__main__ import main
from gateway.settings import Settings, settings_from, variable_name
from middleware.detectors import DEFAULT_RULES_FILE

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# The demo tells the error codes in its story; the codes must exist in the gateway itself.
NOT_THE_GATEWAY = {ROOT / "gateway" / name for name in ("demo.py", "fake_upstream.py", "fake_answers.py")}


FIELDS = {variable_name(field): field for field in Settings.model_fields}


def _tables(header: str) -> list[list[list[str]]]:
    """Every Markdown table of the README whose header row is `header`: its rows, as cells."""
    tables: list[list[list[str]]] = []
    lines = README.splitlines()
    for index, line in enumerate(lines):
        if line.strip() != header:
            continue
        rows = []
        for row in lines[index + 2 :]:  # past the |---| line
            if not row.startswith("|"):
                break
            rows.append([cell.strip() for cell in row.strip().strip("|").split("|")])
        tables.append(rows)
    return tables


def _settings_rows() -> dict[str, str]:
    """README variable -> its default cell, from both settings tables (a `A` / `B` row names two)."""
    tables = _tables("| variable | default | meaning |")
    assert len(tables) == 2, "expected the contract's settings table and the 'Extra knobs' table"
    defaults: dict[str, str] = {}
    for variable_cell, default_cell, _meaning in (row for table in tables for row in table):
        variables = [name.strip().strip("`") for name in variable_cell.split(" / ")]
        values = [value.strip() for value in default_cell.split(" / ")]
        if len(values) == 1:
            values *= len(variables)
        assert len(values) == len(variables), f"row {variable_cell}: {default_cell} does not name one default each"
        for variable, value in zip(variables, values, strict=True):
            assert variable not in defaults, f"{variable} is in the README's settings tables twice"
            defaults[variable] = value
    return defaults


def test_readme_settings_tables_list_exactly_the_settings() -> None:
    documented = set(_settings_rows())

    missing = sorted(set(FIELDS) - documented)
    unknown = sorted(documented - set(FIELDS))

    assert not missing, f"settings missing from the README's tables: {missing}"
    assert not unknown, f"README rows naming no setting of gateway.settings.Settings: {unknown}"


def _default_problem(variable: str, text: str) -> str | None:
    """Why the README's default `text` for `variable` differs from the code's, or None if it matches."""
    field = FIELDS[variable]
    default: Any = Settings.model_fields[field].get_default(call_default_factory=True)
    if text == "unset":
        return None if default is None or (hasattr(default, "__len__") and len(default) == 0) else f"is {default!r}"
    if text == "bundled example":
        ok = default == DEFAULT_RULES_FILE and DEFAULT_RULES_FILE.is_file()
        return None if ok else f"is {default!r}, not the bundled {DEFAULT_RULES_FILE}"
    if text == "the upstream URL":
        settings = settings_from()
        return None if default is None and settings.moderation_base_url == settings.upstream_url else f"is {default!r}"
    match = re.fullmatch(r"`([^`]*)`", text)
    if match is None:
        return f"the README's default {text!r} is neither `a value`, unset, bundled example nor the upstream URL"
    value = match.group(1)
    if value in FIELDS:  # another variable's value: the setting falls back to it when unset
        return None if default is None else f"is {default!r}, not a fallback to {value}"
    # The README's value read the way the variable would be, e.g. "86400" -> 86400.0, "false" -> False.
    parsed = getattr(settings_from(**{field: value}), field)
    return None if parsed == default else f"is {default!r}, the README says {value!r}"


def test_readme_settings_defaults_match_the_code() -> None:
    problems = {
        variable: problem
        for variable, text in _settings_rows().items()
        if variable in FIELDS and (problem := _default_problem(variable, text)) is not None
    }

    assert not problems, f"README defaults that differ from gateway.settings.Settings: {problems}"


def _python_sources() -> dict[Path, str]:
    paths = [*ROOT.glob("gateway/**/*.py"), *ROOT.glob("middleware/**/*.py")]
    return {path: path.read_text(encoding="utf-8") for path in paths if path not in NOT_THE_GATEWAY}


def _error_rows() -> list[tuple[int, str]]:
    tables = _tables("| status | code | when |")
    assert len(tables) == 1, "expected one error table in the README"
    rows = [(int(status), code) for status, codes, _when in tables[0] for code in re.findall(r"`([a-z_]+)`", codes)]
    assert len(rows) >= 10
    return rows


def test_readme_error_codes_exist_in_the_code_with_their_status() -> None:
    sources = _python_sources()
    problems = []
    for status, code in _error_rows():
        if not any(f'"{code}"' in text for text in sources.values()):
            problems.append(f"{code}: no string {code!r} in gateway/ or middleware/")
            continue
        # Where the code is raised as GatewayError(status, "code", ...) the status must be the README's.
        raised = {
            int(found)
            for text in sources.values()
            for found in re.findall(rf'GatewayError\(\s*(\d{{3}}),\s*"{code}"', text)
        }
        if raised - {status}:
            problems.append(f"{code}: the README says {status}, the code raises it with {sorted(raised)}")

    assert not problems, problems


def _dev_commands() -> set[str]:
    """The subcommands ./dev handles itself (its `case` patterns), not the run-anything fallback."""
    script = (ROOT / "dev").read_text(encoding="utf-8")
    patterns = re.findall(r"^\s*([a-z|]+)\)", script, flags=re.MULTILINE)
    return {command for pattern in patterns for command in pattern.split("|")}


def _shell_lines() -> list[str]:
    blocks = re.findall(r"^```sh\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_quick_start_commands_exist() -> None:
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^\./dev (\S+)", quick_start, flags=re.MULTILINE)
    handled = _dev_commands()

    assert {"serve", "test"} <= set(commands)
    assert set(commands) <= handled, f"./dev does not handle {sorted(set(commands) - handled)}"
    for line in _shell_lines():
        if line.startswith("./dev "):
            # Anything else ./dev runs as a command of the environment (`./dev python -m ...`).
            command = line.split()[1]
            installed = (Path(sys.executable).parent / command).exists() or shutil.which(command) is not None
            assert command in handled or installed, f"README runs {line!r}: no such ./dev command or program"
        elif line.startswith("bash "):
            assert (ROOT / line.split()[1]).is_file(), f"README runs {line!r}: no such script"


def test_readme_gateway_subcommands_exist(capsys: pytest.CaptureFixture[str]) -> None:
    subcommands = set(re.findall(r"python -m gateway ([a-z]+)", README)) | {"serve", "migrate", "demo"}

    for subcommand in sorted(subcommands):
        # argparse checks the choice before it prints the help and exits 0.
        with pytest.raises(SystemExit) as exit_info:
            main([subcommand, "--help"])
        assert exit_info.value.code == 0, f"`python -m gateway {subcommand}` is not a command"
    capsys.readouterr()


def test_readme_documents_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out
    choices = re.search(r"\{([a-z,]+)\}", usage)
    assert choices is not None, usage
    commands = set(choices.group(1).split(",")) | _dev_commands()

    undocumented = sorted(
        command
        for command in commands
        if f"./dev {command}" not in README and f"python -m gateway {command}" not in README
    )

    assert not undocumented, f"commands of `python -m gateway` or ./dev the README never mentions: {undocumented}"

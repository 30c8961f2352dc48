"""Checks of deploy/ that need no running service.

The YAML parses; every ppq command line in the compose file, the Dockerfile, the
systemd units and the supervisord config is a valid ``ppq`` invocation (checked
against the real click commands when ppq imports, else against an allowlist);
the units pass ``systemd-analyze verify`` where it is installed; and every stop
timeout gives running tasks more than ``worker.task_timeout``.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = {"master": DEPLOY / "systemd" / "ppq-master@.service", "worker": DEPLOY / "systemd" / "ppq-worker@.service"}
# The default worker.task_timeout; the stop timeouts must exceed it (and the one in deploy/ppq.yaml).
DEFAULT_TASK_TIMEOUT = 300.0

# Flags deploy files may pass to each subcommand, used only when ppq.cli cannot be imported.
ALLOWED_FLAGS = {
    "master": {"--config", "--host", "--port", "--insecure", "--log-level"},
    "worker": {"--config", "--concurrency", "--queue-index", "--master-hosts", "--pool", "--port", "--log-level"},
    "up": {"--config", "--workers", "--concurrency", "--port", "--log-level"},
}

_UNIT_SECONDS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}


def _seconds(value: Any) -> float:
    """A systemd / compose duration ("330s", "5min 30s", "5m30s", "90") in seconds."""
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    assert re.fullmatch(r"(\s*\d+(\.\d+)?\s*[a-z]+)+", text), f"not a duration: {text!r}"
    return sum(float(n) * _UNIT_SECONDS[unit] for n, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text))


def _task_timeout() -> float:
    """The longest task_timeout the deploy files must allow for."""
    config = yaml.safe_load((DEPLOY / "ppq.yaml").read_text())
    return max(DEFAULT_TASK_TIMEOUT, float(config["worker"]["task_timeout"]))


def _cli_flags(sub: str) -> set[str]:
    """The flags ``ppq SUB`` accepts: the real click options when ppq imports, else the allowlist."""
    try:
        from ppq.cli import main
    except ImportError:
        return ALLOWED_FLAGS[sub]
    import click

    command = main.commands[sub]
    return {opt for p in command.params if isinstance(p, click.Option) for opt in (*p.opts, *p.secondary_opts)}


def _check_invocation(argv: list[str]) -> None:
    """Assert that ``argv`` runs ``ppq master|worker|up`` with flags that subcommand has."""
    assert argv and Path(argv[0]).name == "ppq", f"not a ppq command: {argv}"
    assert len(argv) > 1 and argv[1] in ALLOWED_FLAGS, f"subcommand must be one of {sorted(ALLOWED_FLAGS)}: {argv}"
    flags = _cli_flags(argv[1])
    unknown = [a for a in argv[2:] if a.startswith("-") and a.split("=", 1)[0] not in flags]
    assert not unknown, f"`ppq {argv[1]}` has no {unknown}: {argv}"
    try:
        from ppq.cli import main
    except ImportError:
        return
    # With the real CLI also parse the values (types, choices) without running anything.
    main.commands[argv[1]].make_context(argv[1], list(argv[2:]))


def _argv(command: Any) -> list[str]:
    return list(command) if isinstance(command, list) else shlex.split(command)


def _ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read(path, encoding="utf-8")
    return parser


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def test_yaml_files_parse() -> None:
    files = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    assert {f.name for f in files} >= {"docker-compose.yml", "ppq.yaml"}
    for path in files:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_example_config_loads() -> None:
    config = yaml.safe_load((DEPLOY / "ppq.yaml").read_text())
    assert config["auth_token"] is None, "the token belongs in PPQ_AUTH_TOKEN, not in the example file"
    try:
        from ppq.config import load_config
    except ImportError:
        return
    loaded = load_config(str(DEPLOY / "ppq.yaml"), environ={})
    assert loaded.worker.master_hosts == ["master:7600"]
    assert loaded.worker.task_timeout == config["worker"]["task_timeout"]


def test_compose_services() -> None:
    services = _compose()["services"]
    assert services["redis"]["image"].startswith("redis:7")
    assert "--appendonly" in _argv(services["redis"]["command"])
    ppq_services = {name: s for name, s in services.items() if "build" in s or s.get("image", "").startswith("ppq")}
    assert set(ppq_services) == {"master", "worker"}
    for name, service in ppq_services.items():
        argv = _argv(service["command"])
        _check_invocation(argv)
        assert argv[1] == name
        config_file = argv[argv.index("--config") + 1]
        assert any(v.split(":")[1] == config_file for v in service["volumes"]), f"{name}: {config_file} not mounted"
        assert "${PPQ_AUTH_TOKEN" in service["environment"]["PPQ_AUTH_TOKEN"]
        assert service.get("init") is True, f"{name}: PID 1 must forward signals"
    assert "0.0.0.0" in _argv(services["master"]["command"])
    assert services["worker"]["deploy"]["replicas"] == 2
    assert _seconds(services["worker"]["stop_grace_period"]) > _task_timeout()
    for volume in ppq_services["master"]["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("."):
            assert (DEPLOY / source).exists(), source


def test_dockerfile() -> None:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    instructions: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions.setdefault(keyword.upper(), []).append(rest.strip())
    assert instructions["FROM"][0].startswith("python:3.11-slim")
    user = instructions["USER"][-1].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert instructions["STOPSIGNAL"] == ["SIGTERM"]
    cmd = json.loads(instructions["CMD"][-1])
    assert cmd[0] == "ppq"
    _check_invocation(cmd)


@pytest.mark.parametrize("role", sorted(UNITS))
def test_systemd_unit_keys(role: str) -> None:
    service = _ini(UNITS[role])["Service"]
    argv = shlex.split(service["ExecStart"])
    _check_invocation(argv)
    assert argv[:2] == ["/usr/local/bin/ppq", role]
    assert argv[argv.index("--config") + 1] == "/etc/ppq/%i.yaml"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed", "only the main process may get SIGTERM"
    assert service["User"] not in ("root", "0")
    assert service["NoNewPrivileges"] == "true"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "true"
    assert "/var/lib/ppq" in service["ReadWritePaths"].split()
    stop = _seconds(service["TimeoutStopSec"])
    if role == "worker":
        assert stop > _task_timeout(), "SIGKILL would cut tasks that were allowed to finish"
        assert "-USR2" in service["ExecReload"]
    else:
        assert stop > 10


def _verify_errors(unit: Path) -> list[str]:
    """Syntax errors (unknown keys or sections, unparsable values) systemd-analyze reports."""
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=120
    )
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith(f"{unit}:") or "fatal error" in line]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # The ppq binary need not exist here: verify a copy that runs an existing one.
    stand_in = shutil.which("true") or "/bin/true"
    for role, path in UNITS.items():
        unit = tmp_path / f"ppq-{role}@default.service"
        unit.write_text(path.read_text().replace("/usr/local/bin/ppq", stand_in))
        assert _verify_errors(unit) == [], unit.read_text()
    # The check itself catches what it should.
    broken = tmp_path / "ppq-broken@default.service"
    broken.write_text(f"[Service]\nExecStart={stand_in}\nRestartt=on-failure\n")
    assert _verify_errors(broken)


def test_supervisord() -> None:
    parser = _ini(DEPLOY / "supervisord" / "ppq.conf")
    master, worker = parser["program:ppq-master"], parser["program:ppq-worker"]
    for role, program in (("master", master), ("worker", worker)):
        argv = shlex.split(program["command"])
        _check_invocation(argv)
        assert argv[1] == role
        assert program["stopsignal"] == "TERM"
        assert program["stopasgroup"] == "false", "only the main process may get SIGTERM"
        assert program["user"] not in ("root", "0")
    assert worker["numprocs"] == "2"
    assert worker["process_name"] == "%(program_name)s_%(process_num)02d"
    assert _seconds(worker["stopwaitsecs"]) > _task_timeout()
    assert _seconds(master["stopwaitsecs"]) > 10

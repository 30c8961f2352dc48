"""Checks of deploy/: the files parse, and what each example runs works as written.

- The YAML parses; ``deploy/ppq.yaml`` loads with ppq's own loader and runs one host
  without a token; every ppq command line in the compose file (through ``sh -c``
  where it has one, expanded by a real shell), the Dockerfile, the systemd units and
  the supervisord config parses with the real click commands.
- ``docker compose config`` (Compose v2, when installed) accepts the compose file;
  the ``redis`` service's command line is accepted by a real redis-server.
- The compose stack's commands run for real in a network namespace where the
  service names resolve as Docker's DNS resolves them: a task pushed inside it runs,
  and ``ppq workers`` reads the worker's stats through its control object, which
  binds and advertises the container's own (non-loopback) address, token required.
- The units pass ``systemd-analyze verify``, and the worker unit carries every
  hardening line of the master unit.
- deploy/README.md's host setup installs what the units and supervisord read; its
  account and home directory commands run as written in a throwaway root (a mount
  namespace over a copy of /etc and an empty /var/lib), where supervisor's own
  parser reads the supervisord config, and supervisord runs it: the programs run
  as ppq in its home, a task runs, and they stop with status 0.
- Every stop timeout gives running tasks more than ``worker.task_timeout``.
- The README's "Results and Redis growth" names real keys, and the embedded
  redis-server runs with the AOF rewrite settings it states.

A check whose tool is missing (systemd-analyze, Compose v2, supervisor, unshare
as root) is skipped, naming the tool.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from ppq.cli import main
from ppq.config import load_config
from ppq.embedded import find_redis_server, free_port
from ppq.errors import AuthError, ConfigError, PPQError
from ppq.rpc import WORKER_OBJECT, PyroFunc, check_bind

from .conftest import REPO, wait_for

DEPLOY = REPO / "deploy"
UNITS = {"master": DEPLOY / "systemd" / "ppq-master@.service", "worker": DEPLOY / "systemd" / "ppq-worker@.service"}
SUPERVISORD = DEPLOY / "supervisord" / "ppq.conf"
DEPLOY_README = DEPLOY / "README.md"
# The default worker.task_timeout; the stop timeouts must exceed it (and the one in deploy/ppq.yaml).
DEFAULT_TASK_TIMEOUT = 300.0
# The subcommands a deploy file may run.
DAEMONS = ("master", "worker", "up")
# [Service] keys that confine a unit; the worker unit must have each the master unit has, with its value.
HARDENING = re.compile(r"^(NoNewPrivileges|CapabilityBoundingSet|Protect\w+|Private\w+|Restrict\w+|LockPersonality|"
                       r"SystemCallArchitectures|StateDirectory|ReadWritePaths|MemoryDenyWriteExecute)$")

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


def _check_invocation(argv: list[str]) -> click.Context:
    """Assert that ``argv`` runs ``ppq master|worker|up`` and parses with the real click command
    (flags, types, choices) without running anything; return the parsed context."""
    assert argv and Path(argv[0]).name == "ppq", f"not a ppq command: {argv}"
    assert len(argv) > 1 and argv[1] in DAEMONS, f"subcommand must be one of {DAEMONS}: {argv}"
    command = main.commands[argv[1]]
    flags = {opt for p in command.params if isinstance(p, click.Option) for opt in (*p.opts, *p.secondary_opts)}
    unknown = [a for a in argv[2:] if a.startswith("-") and a.split("=", 1)[0] not in flags]
    assert not unknown, f"`ppq {argv[1]}` has no {unknown}: {argv}"
    return command.make_context(argv[1], list(argv[2:]))


def _ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read(path, encoding="utf-8")
    return parser


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def _unescape(value: Any) -> Any:
    """What compose hands the container: ``$$`` in the file is a literal ``$``."""
    if isinstance(value, list):
        return [_unescape(v) for v in value]
    return value.replace("$$", "$") if isinstance(value, str) else value


def _ppq_stub(tmp_path: Path) -> Path:
    """A directory holding a ``ppq`` that prints the argv it was given as JSON."""
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "ppq"
    stub.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv))\n")
    stub.chmod(0o755)
    return bin_dir


def _container_argv(command: Any, tmp_path: Path, env: dict[str, str]) -> list[str]:
    """The argv a service's command runs ppq with: a list as it is, ``sh -c SCRIPT`` as a
    real shell expands it (with ``env``, as Docker sets it), a string split like compose."""
    argv = _unescape(command if isinstance(command, list) else shlex.split(command))
    if argv[:2] != ["sh", "-c"]:
        return argv  # type: ignore[no-any-return]
    assert len(argv) == 3, f"sh -c takes one script: {argv}"
    script = argv[2]
    assert script.startswith("exec "), f"the shell must exec ppq, so that it gets tini's signals: {script!r}"
    assert subprocess.run(["sh", "-n", "-c", script], capture_output=True).returncode == 0, script
    stub = _ppq_stub(tmp_path)
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30,
                          env={**env, "PATH": f"{stub}:/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    ran = json.loads(done.stdout)
    return ["ppq", *ran[1:]]


def test_yaml_files_parse() -> None:
    files = sorted(DEPLOY.rglob("*.yml")) + sorted(DEPLOY.rglob("*.yaml"))
    assert {f.name for f in files} >= {"docker-compose.yml", "ppq.yaml"}
    for path in files:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_example_config_runs_one_host_without_a_token() -> None:
    config = yaml.safe_load((DEPLOY / "ppq.yaml").read_text())
    assert config["auth_token"] is None, "the token belongs in PPQ_AUTH_TOKEN, not in the example file"
    loaded = load_config(str(DEPLOY / "ppq.yaml"), environ={})
    # No redis_map: the master runs its own redis-server; the workers pull from that master.
    assert loaded.master.redis_map == {}
    assert loaded.worker.master_hosts == [loaded.own_master()] == ["127.0.0.1:7600"]
    assert loaded.worker.task_timeout == config["worker"]["task_timeout"]
    assert loaded.master.result_ttl == config["master"]["result_ttl"]
    check_bind(loaded.master.host, loaded.any_token, loaded.master.insecure, "master.host")
    check_bind(loaded.worker.host, loaded.any_token, loaded.worker.insecure, "worker.host")


def test_compose_services(tmp_path: Path) -> None:
    services = _compose()["services"]
    assert services["redis"]["image"].startswith("redis:7")
    assert "--appendonly" in services["redis"]["command"]
    ppq_services = {name: s for name, s in services.items() if "build" in s or s.get("image", "").startswith("ppq")}
    assert set(ppq_services) == {"master", "worker"}
    container_env = {"HOSTNAME": "0123456789ab", "PPQ_AUTH_TOKEN": "t"}
    for name, service in ppq_services.items():
        argv = _container_argv(service["command"], tmp_path, container_env)
        _check_invocation(argv)
        assert argv[1] == name
        config_file = argv[argv.index("--config") + 1]
        assert any(v.split(":")[1] == config_file for v in service["volumes"]), f"{name}: {config_file} not mounted"
        assert "${PPQ_AUTH_TOKEN:?" in service["environment"]["PPQ_AUTH_TOKEN"], "compose must refuse to start"
        assert service.get("init") is True, f"{name}: PID 1 must forward signals"
        assert "ports" not in service or name == "master", f"{name}: publishes a port"
        for volume in service["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    master = _container_argv(services["master"]["command"], tmp_path, container_env)
    assert master[master.index("--host") + 1] == "0.0.0.0"
    assert master[master.index("--redis-map") + 1] == "0=redis://redis:6379/0"
    assert all(p.startswith("127.0.0.1:") for p in services["master"]["ports"]), "published on loopback only"
    worker = _container_argv(services["worker"]["command"], tmp_path, container_env)
    # The control object binds the container's own name, as the shell expanded it.
    assert worker[worker.index("--host") + 1] == "0123456789ab"
    assert worker[worker.index("--master-hosts") + 1] == "master:7600"
    assert services["worker"]["deploy"]["replicas"] == 2
    assert _seconds(services["worker"]["stop_grace_period"]) > _task_timeout()


def test_compose_binds_need_the_token(tmp_path: Path) -> None:
    """What the compose commands bind is refused without a token, and accepted with one."""
    services = _compose()["services"]
    env = {"HOSTNAME": "0123456789ab"}
    for role in ("master", "worker"):
        argv = _container_argv(services[role]["command"], tmp_path, env)
        host = argv[argv.index("--host") + 1]
        key = f"{role}.host"
        assert argv[argv.index("--config") + 1] == "/etc/ppq/ppq.yaml"  # deploy/ppq.yaml, mounted
        for environ, refused in (({}, True), ({"PPQ_AUTH_TOKEN": "t"}, False)):
            config = load_config(str(DEPLOY / "ppq.yaml"), {key: host}, environ=environ)
            section = getattr(config, role)
            if refused:
                with pytest.raises(ConfigError, match=key):
                    check_bind(section.host, config.any_token, section.insecure, key)
            else:
                check_bind(section.host, config.any_token, section.insecure, key)


def _compose_binary() -> list[str] | None:
    """Compose v2: ``docker compose`` or a ``docker-compose`` v2 binary on PATH."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        version = subprocess.run([standalone, "version", "--short"], capture_output=True, text=True).stdout.strip()
        if version.lstrip("v").startswith("2"):
            return [standalone]
    return None


@pytest.mark.skipif(_compose_binary() is None, reason="Docker Compose v2 (docker compose or docker-compose) is missing")
def test_compose_config_validates() -> None:
    compose = _compose_binary()
    assert compose is not None
    env = {k: v for k, v in os.environ.items() if k != "PPQ_AUTH_TOKEN"}
    done = subprocess.run([*compose, "config", "--format", "json"], cwd=DEPLOY, capture_output=True, text=True,
                          env={**env, "PPQ_AUTH_TOKEN": "t"}, timeout=60)
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)["services"]
    raw = _compose()["services"]
    for name in ("redis", "master", "worker"):
        assert _unescape(resolved[name]["command"]) == _unescape(raw[name]["command"]), name
    assert resolved["worker"]["deploy"]["replicas"] == 2
    # Without the token compose stops, and says how to set it.
    done = subprocess.run([*compose, "config"], cwd=DEPLOY, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0 and "PPQ_AUTH_TOKEN" in done.stderr


def test_compose_redis_command_runs(tmp_path: Path) -> None:
    """The redis service's flags, AOF rewrite settings included, are ones a real redis-server takes."""
    import redis

    argv = _compose()["services"]["redis"]["command"]
    assert argv[0] == "redis-server"
    port = free_port()
    proc = subprocess.Popen([find_redis_server(), *argv[1:], "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, socket_timeout=2)

        def answers() -> bool:
            assert proc.poll() is None, "redis-server refused the compose file's flags"
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(answers, what="redis-server to answer")
        settings = client.config_get("a*")
        assert settings["appendonly"] == "yes"
        assert settings["auto-aof-rewrite-percentage"] == argv[argv.index("--auto-aof-rewrite-percentage") + 1]
        assert int(settings["auto-aof-rewrite-min-size"]) == 64 * 1024 * 1024
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_results_and_redis_growth_are_documented(tmp_path: Path) -> None:
    """The README's paragraph names real keys, and the embedded redis-server does run with the
    AOF rewrite settings it states (Redis's defaults)."""
    import redis

    from ppq.config import Config
    from ppq.embedded import RedisServer

    readme = (REPO / "README.md").read_text()
    paragraph = readme[readme.index("### Results and Redis growth"):]
    paragraph = paragraph[:paragraph.index("\n#")]
    config = Config()
    for key in re.findall(r"`((?:master|limits)\.\w+)`", paragraph):
        section, name = key.split(".")
        assert hasattr(getattr(config, section), name), key
    assert "`master.result_ttl`" in paragraph and "auto-aof-rewrite-min-size" in paragraph
    example = (REPO / "config.example.yaml").read_text()
    assert "auto-aof-rewrite-percentage" in example and "auto-aof-rewrite-min-size" in example
    with RedisServer(str(tmp_path / "embedded")) as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        settings = client.config_get("auto-aof-rewrite-*")
        client.close()
    assert settings == {"auto-aof-rewrite-percentage": "100", "auto-aof-rewrite-min-size": str(64 * 1024 * 1024)}


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
    assert "--create-home" in instructions["RUN"][0] and "/var/lib/ppq" in instructions["RUN"][0]
    assert instructions["WORKDIR"] == ["/var/lib/ppq"]
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
    assert service["EnvironmentFile"] == "-/etc/ppq/%i.env"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed", "only the main process may get SIGTERM"
    assert service["User"] not in ("root", "0")
    assert service["NoNewPrivileges"] == "true"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "true"
    assert service["ProtectHome"] == "true"
    assert service["CapabilityBoundingSet"] == ""
    assert "/var/lib/ppq" in service["ReadWritePaths"].split()
    assert service["StateDirectory"] == "ppq"
    assert service["WorkingDirectory"] == "/var/lib/ppq"
    stop = _seconds(service["TimeoutStopSec"])
    if role == "worker":
        assert stop > _task_timeout(), "SIGKILL would cut tasks that were allowed to finish"
        assert "-USR2" in service["ExecReload"]
    else:
        assert stop > 10


def test_worker_unit_is_hardened_like_the_master_unit() -> None:
    master, worker = (_ini(UNITS[role])["Service"] for role in ("master", "worker"))
    hardening = {k: v for k, v in master.items() if HARDENING.match(k)}
    assert len(hardening) >= 15, sorted(hardening)
    assert {k: v for k, v in worker.items() if HARDENING.match(k)} == hardening
    # What task code commonly needs stays allowed in the worker, and its comments say how to loosen the rest.
    for key in ("PrivateDevices", "MemoryDenyWriteExecute", "RestrictNamespaces", "SystemCallFilter"):
        assert key not in worker, f"{key} would break ordinary task code"
    text = UNITS["worker"].read_text()
    for hint in ("ReadWritePaths=/srv/output", "ProtectHome=read-only", "PrivateTmp=false",
                 "RestrictAddressFamilies=AF_NETLINK", "SystemCallArchitectures=", "systemctl edit"):
        assert hint in text, hint


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
    exposure: dict[str, float] = {}
    for role, path in UNITS.items():
        unit = tmp_path / f"ppq-{role}@default.service"
        unit.write_text(path.read_text().replace("/usr/local/bin/ppq", stand_in))
        assert _verify_errors(unit) == [], unit.read_text()
        # systemd's own rating of the hardening (0 = locked down, 10 = exposed), where it can rate a file.
        rated = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                               capture_output=True, text=True, timeout=120)
        found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", rated.stdout)
        if found:
            exposure[role] = float(found.group(1))
    if exposure:
        assert exposure["worker"] == exposure["master"] <= 5.0, exposure
    # The check itself catches what it should.
    broken = tmp_path / "ppq-broken@default.service"
    broken.write_text(f"[Service]\nExecStart={stand_in}\nRestartt=on-failure\n")
    assert _verify_errors(broken)


def test_supervisord() -> None:
    parser = _ini(SUPERVISORD)
    master, worker = parser["program:ppq-master"], parser["program:ppq-worker"]
    for role, program in (("master", master), ("worker", worker)):
        argv = shlex.split(program["command"])
        _check_invocation(argv)
        assert argv[1] == role
        assert program["stopsignal"] == "TERM"
        assert program["stopasgroup"] == "false", "only the main process may get SIGTERM"
        assert program["user"] not in ("root", "0")
        assert program["directory"] == "/var/lib/ppq"
    assert master["environment"].count("/var/lib/ppq") == 2, "HOME and XDG_DATA_HOME: the embedded Redis's data"
    assert worker["numprocs"] == "2"
    assert worker["process_name"] == "%(program_name)s_%(process_num)02d"
    assert "--port 0" in worker["command"], "two agents on one host need two control ports"
    assert _seconds(worker["stopwaitsecs"]) > _task_timeout()
    assert _seconds(master["stopwaitsecs"]) > 10


# -- deploy/README.md: what its commands install is what the examples read ---------------------------------


def _sh_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", DEPLOY_README.read_text(), re.DOTALL)


def _block(marker: str) -> str:
    found = [b for b in _sh_blocks() if marker in b]
    assert len(found) == 1, f"one README block holds {marker!r}"
    return found[0]


def _lines(block: str) -> list[list[str]]:
    """Each command of a block, continuation lines joined, comments dropped, as words."""
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_blocks_are_shell() -> None:
    assert len(_sh_blocks()) >= 5
    for block in _sh_blocks():
        done = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert done.returncode == 0, (block, done.stderr)


def test_readme_installs_what_the_examples_read() -> None:
    setup = _lines(_block("useradd"))
    installed = {words[-1] for words in setup if words[0] == "install" and "-d" not in words}
    made = {words[-1] for words in setup if words[0] == "install" and "-d" in words}
    linked = {words[-1] for words in setup if words[:2] == ["ln", "-s"]}
    written = {w for words in setup for i, w in enumerate(words) if i and words[i - 1] == ">"}
    # The home directory every example runs in exists and belongs to ppq.
    useradd = next(words for words in setup if words[0] == "useradd")
    home = useradd[useradd.index("--home-dir") + 1]
    assert "--create-home" in useradd or any(
        w[0] == "install" and "-d" in w and w[w.index("-o") + 1] == "ppq" and w[-1] == home for w in setup
        if "-o" in w), "useradd --system creates no home directory"
    assert home == "/var/lib/ppq" in made
    # The units read /etc/ppq/<instance>.yaml and .env; the README starts the instance "default".
    instance = "default"
    assert "ppq-worker@default" in _block("systemctl enable")
    assert f"/etc/ppq/{instance}.yaml" in installed and f"/etc/ppq/{instance}.env" in written
    for program in ("ppq-master", "ppq-worker"):
        argv = shlex.split(_ini(SUPERVISORD)[f"program:{program}"]["command"])
        assert argv[argv.index("--config") + 1] in installed, f"supervisord's {program} reads a file never installed"
        assert argv[0] in linked
    for path in UNITS.values():
        assert shlex.split(_ini(path)["Service"]["ExecStart"])[0] in linked
    supervisord = _lines(_block("supervisorctl"))
    assert any(words[0] == "install" and words[-2] == "deploy/supervisord/ppq.conf" for words in supervisord)
    env_file = _lines(_block("EnvironmentFile"))
    assert any(f"EnvironmentFile=/etc/ppq/{instance}.env" in " ".join(words) for words in env_file)


def _root_sandbox_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a mount namespace over a copy of /etc)"
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    if subprocess.run(["unshare", "--mount", "--net", "--uts", "true"], capture_output=True).returncode != 0:
        return "unshare cannot make mount, network and hostname namespaces here"
    return None


def _in_throwaway_root(tmp_path: Path, script: str) -> subprocess.CompletedProcess[str]:
    """Run a bash ``script`` in a private mount namespace where /etc is a copy and /var/lib is
    empty: users it creates and directories it makes there vanish with the namespace."""
    etc, var_lib = tmp_path / "etc", tmp_path / "var-lib"
    shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True)
    var_lib.mkdir()
    prelude = f"set -e\nmount --bind {shlex.quote(str(etc))} /etc\nmount --bind {shlex.quote(str(var_lib))} /var/lib\n"
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", prelude + script],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(_root_sandbox_reason() is not None, reason=str(_root_sandbox_reason()))
def test_readme_host_setup_creates_the_account_and_its_home(tmp_path: Path) -> None:
    setup = [line for line in _block("useradd").splitlines() if line.startswith(("useradd ", "install -d "))]
    assert len(setup) == 3, setup  # the account, its home, /etc/ppq
    check = """
getent passwd ppq
stat -c '%U:%G %a' /var/lib/ppq
runuser -u ppq -- sh -c 'cd /var/lib/ppq && touch written && echo ok'
"""
    had_ppq = subprocess.run(["getent", "passwd", "ppq"], capture_output=True).returncode == 0
    done = _in_throwaway_root(tmp_path, "\n".join(setup) + "\n" + check)
    assert done.returncode == 0, done.stderr
    passwd, owner, wrote = done.stdout.splitlines()
    name, _, uid, _, _, home, shell = passwd.split(":")
    assert (name, home, shell) == ("ppq", "/var/lib/ppq", "/usr/sbin/nologin")
    assert int(uid) < 1000, "a system account"
    assert owner == "ppq:ppq 750"
    assert wrote == "ok"
    # The account stayed in the namespace's copy of /etc; the home went to the stand-in /var/lib.
    assert (subprocess.run(["getent", "passwd", "ppq"], capture_output=True).returncode == 0) == had_ppq
    assert "ppq:" in (tmp_path / "etc" / "passwd").read_text()
    assert (tmp_path / "var-lib" / "ppq" / "written").exists()


@pytest.mark.skipif(_root_sandbox_reason() is not None, reason=str(_root_sandbox_reason()))
def test_supervisor_parses_the_conf_after_the_host_setup(tmp_path: Path) -> None:
    pytest.importorskip("supervisor.options", reason="supervisor is not installed (pip install supervisor)")
    setup = [line for line in _block("useradd").splitlines() if line.startswith(("useradd ", "install -d "))]
    main_conf = tmp_path / "supervisord.conf"
    main_conf.write_text(f"[supervisord]\nlogfile={tmp_path}/supervisord.log\npidfile={tmp_path}/supervisord.pid\n"
                         f"[include]\nfiles={SUPERVISORD}\n")
    parse = f"""
from supervisor.options import ServerOptions
options = ServerOptions()
options.realize(args=["-c", {str(main_conf)!r}])
import json, os, pwd
out = {{}}
for group in options.process_group_configs:
    for p in group.process_configs:
        out[p.name] = {{"group": group.name, "command": p.command, "uid": p.uid, "directory": p.directory,
                       "stopsignal": int(p.stopsignal), "stopwaitsecs": p.stopwaitsecs,
                       "environment": p.environment, "ppq_uid": pwd.getpwnam("ppq").pw_uid,
                       "directory_owner": os.stat(p.directory).st_uid}}
print(json.dumps(out))
"""
    done = _in_throwaway_root(tmp_path, "\n".join(setup) + f"\n{shlex.quote(sys.executable)} -c {shlex.quote(parse)}\n")
    assert done.returncode == 0, done.stderr
    programs = json.loads(done.stdout)
    assert set(programs) == {"ppq-master", "ppq-worker_00", "ppq-worker_01"}
    for name, p in programs.items():
        assert p["group"] == "ppq"
        assert p["uid"] == p["ppq_uid"] == p["directory_owner"], name
        assert p["directory"] == "/var/lib/ppq"
        assert p["stopsignal"] == 15
        _check_invocation(shlex.split(p["command"]))
    assert programs["ppq-worker_00"]["stopwaitsecs"] > _task_timeout()
    assert programs["ppq-master"]["environment"]["XDG_DATA_HOME"] == "/var/lib/ppq"


# -- the compose stack, run for real -----------------------------------------------------------------------

# Addresses on the namespace's loopback device that stand for the containers: none is a
# loopback address, so binding one needs the token, as it does in a container.
_NETNS_HOSTS = {"redis": "10.231.0.4", "master": "10.231.0.3", "worker": "10.231.0.2"}
_WORKER_HOSTNAME = "c0ffee123456"
_TASKS = "def add(a, b):\n    return a + b\n"


def compose_stack_in_netns(workdir: str) -> None:
    """Run inside ``unshare --net --mount``: the compose file's three commands, a push and
    ``ppq workers``, as a user would through ``docker compose exec master``; prints JSON."""
    work = Path(workdir)
    # The worker's container: its hostname (Docker sets the kernel's and $HOSTNAME alike).
    subprocess.run(["hostname", _WORKER_HOSTNAME], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for address in _NETNS_HOSTS.values():
        subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True)
    # /etc as the containers see it: the compose network's names, and deploy/ppq.yaml mounted.
    etc = work / "etc"
    shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True)
    (etc / "hosts").write_text("127.0.0.1 localhost\n" + "".join(
        f"{address} {_WORKER_HOSTNAME if name == 'worker' else name}\n" for name, address in _NETNS_HOSTS.items()))
    (etc / "ppq").mkdir()
    shutil.copyfile(DEPLOY / "ppq.yaml", etc / "ppq" / "ppq.yaml")
    subprocess.run(["mount", "--bind", str(etc), "/etc"], check=True)
    bin_dir = work / "bin"
    bin_dir.mkdir()
    (bin_dir / "ppq").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m ppq \"$@\"\n")
    (bin_dir / "ppq").chmod(0o755)
    (work / "app" / "myapp").mkdir(parents=True)
    (work / "app" / "myapp" / "__init__.py").write_text("")
    (work / "app" / "myapp" / "tasks.py").write_text(_TASKS)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(work),
           "PPQ_AUTH_TOKEN": "compose-test-token", "HOSTNAME": _WORKER_HOSTNAME}
    services = _compose()["services"]
    assert [v.split(":")[:2] for v in services["master"]["volumes"]] == [["./ppq.yaml", "/etc/ppq/ppq.yaml"]]

    def argv_of(name: str) -> list[str]:
        return _unescape(services[name]["command"])  # type: ignore[no-any-return]

    redis_argv = argv_of("redis")
    procs = []
    result: dict[str, Any] = {}
    try:
        procs.append(subprocess.Popen(
            [find_redis_server(), *redis_argv[1:], "--bind", _NETNS_HOSTS["redis"], "--port", "6379",
             "--dir", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        logs = {}
        for name in ("master", "worker"):
            logs[name] = open(work / f"{name}.log", "wb")  # noqa: SIM115 - closed below
            procs.append(subprocess.Popen(argv_of(name), cwd=work / "app", env=env, stdout=logs[name],
                                          stderr=subprocess.STDOUT))

        def ppq(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["ppq", *args], cwd=work, env=env, capture_output=True, text=True, timeout=60)

        def listed() -> bool:
            """A worker is listed with its control object (its first heartbeat brings that)."""
            done = ppq("workers", "--json")
            return done.returncode == 0 and any(row["worker"].get("control_uri") for row in json.loads(done.stdout))

        try:
            wait_for(listed, timeout=60, interval=0.2, what="the worker to register")
            result["push"] = ppq("push", "myapp.tasks.add", "2", "3", "--wait").stdout.strip()
            done = ppq("workers", "--json")
            result["workers"] = json.loads(done.stdout) if done.returncode == 0 else done.stderr
            # The control object itself, called with a wrong token and with the right one.
            uri = f"PYRO:{WORKER_OBJECT}@{_WORKER_HOSTNAME}:7620"
            for name, token in (("wrong_token", "not-the-token"), ("right_token", env["PPQ_AUTH_TOKEN"])):
                control = PyroFunc(uri, token=token, timeout=3, objid=WORKER_OBJECT)
                try:
                    result[name] = control("get_worker_stats")
                except AuthError as exc:
                    result[name] = f"refused: {exc}"
                except PPQError as exc:
                    result[name] = f"unreachable: {exc}"
                control.close()
        finally:
            for name, f in logs.items():
                f.close()
                result[f"{name}_log"] = (work / f"{name}.log").read_text(errors="replace")[-3000:]
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    print(json.dumps(result))


@pytest.mark.skipif(_root_sandbox_reason() is not None, reason=str(_root_sandbox_reason()))
@pytest.mark.skipif(shutil.which("ip") is None, reason="ip (iproute2) is not installed")
def test_compose_stack_in_a_network_namespace(tmp_path: Path) -> None:
    """The master's side reads a worker's control object by the address the worker advertises."""
    code = f"from tests.test_deploy import compose_stack_in_netns; compose_stack_in_netns({str(tmp_path)!r})"
    done = subprocess.run(["unshare", "--net", "--mount", "--uts", "--propagation", "private", sys.executable,
                           "-c", code], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["push"].splitlines()[-1] == "5", result  # the task id, then its result
    rows = result["workers"]
    assert isinstance(rows, list) and len(rows) == 1, result
    worker = rows[0]["worker"]
    assert worker.get("control_uri") == f"PYRO:worker@{_WORKER_HOSTNAME}:7620", worker
    assert rows[0]["stats"]["myapp.tasks.add"]["ok"] == 1, rows[0]
    # The control object answers the token only.
    assert result["wrong_token"].startswith("refused: authentication failed"), result["wrong_token"]
    assert result["right_token"] == rows[0]["stats"]


# -- supervisord, run as written -----------------------------------------------------------------------------


def _blocked(path: str) -> list[str]:
    """The directories above ``path`` that other users cannot enter (no o+x)."""
    return [str(p) for p in Path(path).resolve().parents if not os.stat(p).st_mode & 0o001]


def _supervisord_binary() -> str | None:
    return shutil.which("supervisord", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))


def _supervisord_reason() -> str | None:
    reason = _root_sandbox_reason()
    if reason:
        return reason
    if _supervisord_binary() is None:
        return "supervisord is not installed (pip install supervisor)"
    # The driver shows the interpreter's tree under a private /root to its namespace; nothing else.
    for path, allowed in ((sys.executable, ["/root"]), (sys.prefix, ["/root"]), (str(REPO), [])):
        if [d for d in _blocked(path) if d not in allowed]:
            return f"{path} is not reachable by other users, and supervisord runs ppq as user ppq"
    return None


def supervisord_stack_in_namespace(workdir: str) -> None:
    """Run inside ``unshare --net --mount``: deploy/README.md's host setup, then supervisord with
    deploy/supervisord/ppq.conf as written, a task pushed and run, and supervisord stopped; prints JSON."""
    work = Path(workdir)
    run = lambda *argv: subprocess.run(list(argv), check=True)  # noqa: E731
    run("ip", "link", "set", "lo", "up")
    # A throwaway root: /etc a copy, /var/lib empty, /usr/local/bin holding the `ppq` the README links there.
    etc, var_lib, local_bin = work / "etc", work / "var-lib", work / "local-bin"
    shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True)
    var_lib.mkdir()
    local_bin.mkdir()
    (local_bin / "ppq").write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(REPO))} "
                                   f"exec {shlex.quote(sys.executable)} -m ppq \"$@\"\n")
    (local_bin / "ppq").chmod(0o755)
    for source, target in ((etc, "/etc"), (var_lib, "/var/lib"), (local_bin, "/usr/local/bin")):
        run("mount", "--bind", str(source), target)
    python = os.path.realpath(sys.executable)
    if "/root" in _blocked(python) or "/root" in _blocked(sys.prefix):
        # /root is private (0700): show the interpreter's trees under it, and nothing else of it.
        tops = sorted({"/root/" + Path(p).resolve().parts[2] for p in (python, sys.prefix)
                       if Path(p).resolve().is_relative_to("/root")})
        for i, top in enumerate(tops):
            (work / f"top{i}").mkdir()
            run("mount", "--bind", top, str(work / f"top{i}"))
        run("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/root")
        for i, top in enumerate(tops):
            Path(top).mkdir()
            run("mount", "--bind", str(work / f"top{i}"), top)
    # The README's host setup, as written (the venv and its link are stood in for above).
    setup = [line for line in _block("useradd").splitlines()
             if line.startswith(("useradd ", "install ", "echo "))]
    subprocess.run(["bash", "-e", "-c", "\n".join(setup)], cwd=REPO, check=True)
    # Task code in the workers' directory, under the name deploy/ppq.yaml allows.
    app = Path("/var/lib/ppq/myapp")
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "tasks.py").write_text(_TASKS)
    # supervisord's own config, with the conf the README installs in /etc/supervisor/conf.d/.
    conf_d = Path("/etc/supervisor/conf.d")
    conf_d.mkdir(parents=True)
    subprocess.run(["bash", "-e", "-c", _lines_of(_block("supervisorctl"), "install ")], cwd=REPO, check=True)
    main_conf = work / "supervisord.conf"
    main_conf.write_text(f"[supervisord]\nnodaemon=true\nuser=root\nlogfile={work}/supervisord.log\n"
                         f"pidfile={work}/supervisord.pid\nchildlogdir={work}\n[include]\nfiles={conf_d}/*.conf\n")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(work)}
    supervisord = _supervisord_binary()
    result: dict[str, Any] = {}
    proc = subprocess.Popen([str(supervisord), "-c", str(main_conf)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def ppq(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["/usr/local/bin/ppq", *args, "--config", "/etc/ppq/default.yaml"], env=env,
                                  capture_output=True, text=True, timeout=60)

        def both_listed() -> bool:
            done = ppq("workers", "--json")
            return done.returncode == 0 and len(json.loads(done.stdout)) == 2

        wait_for(both_listed, timeout=90, interval=0.2, what="both workers to register")
        result["push"] = ppq("push", "myapp.tasks.add", "2", "3", "--wait").stdout.strip()
        result["users"] = sorted({Path(f"/proc/{pid}").stat().st_uid for pid in _children(proc.pid)})
        result["ppq_uid"] = int(subprocess.run(["id", "-u", "ppq"], capture_output=True, text=True).stdout)
        result["redis_data"] = sorted(os.listdir("/var/lib/ppq/ppq/master-7600"))
    finally:
        proc.terminate()  # supervisord stops its programs with their stopsignal, and exits
        try:
            result["supervisord_exit"] = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            result["supervisord_exit"] = proc.wait(10)
        logs = {p.name: p.read_text(errors="replace")[-2000:] for p in work.glob("*.log")}
        result["logs"] = logs
    print(json.dumps(result))


def _lines_of(block: str, prefix: str) -> str:
    return "\n".join(line for line in block.splitlines() if line.startswith(prefix))


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid``."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").iterdir():
            kids = (task / "children").read_text().split() if (task / "children").exists() else []
            out.extend(int(k) for k in kids)
            todo.extend(int(k) for k in kids)
    return out


@pytest.mark.skipif(_supervisord_reason() is not None, reason=str(_supervisord_reason()))
def test_supervisord_runs_the_readme_setup_as_written(tmp_path: Path) -> None:
    """Host setup and supervisord conf as written: the programs start as ppq in their home, the
    embedded Redis keeps its data there, a task runs, and a stop is clean."""
    code = (f"from tests.test_deploy import supervisord_stack_in_namespace; "
            f"supervisord_stack_in_namespace({str(tmp_path)!r})")
    done = subprocess.run(["unshare", "--net", "--mount", "--propagation", "private", sys.executable, "-c", code],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["push"].splitlines()[-1] == "5", result
    assert result["users"] == [result["ppq_uid"]], "every program runs as ppq"
    assert "appendonly.aof" in result["redis_data"] or "appendonlydir" in result["redis_data"], result["redis_data"]
    assert result["supervisord_exit"] == 0, result["logs"]
    log = result["logs"]["supervisord.log"]
    stopped = dict(re.findall(r"stopped: (\S+) \((.*?)\)", log))
    assert stopped == {name: "exit status 0" for name in ("ppq-master", "ppq-worker_00", "ppq-worker_01")}, log

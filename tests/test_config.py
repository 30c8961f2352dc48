"""Config loading: YAML + PPQ_* env + flags, one precedence, validation naming the key.
(The same precedence through the real CLI is in test_cli.py.)"""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from ppq.config import Config, env_overrides, load_config, to_dict
from ppq.errors import ConfigError
from ppq.rpc import PyroFunc, master_uri
from ppq.targets import redis_url

from .conftest import REPO


def write(tmp_path, data, name="ppq.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def test_defaults():
    config = load_config(environ={})
    assert config.master.port == 7600 and config.master.host == "127.0.0.1"
    assert config.worker.port == 7620
    assert config.worker.master_hosts == ["127.0.0.1:7600"]
    assert config.master.redis_map == {}
    assert config.worker.allowed_modules == [] and config.auth_token is None
    assert config.client_masters() == ["127.0.0.1:7600"]


def test_the_example_file_documents_every_key_with_its_default():
    path = REPO / "config.example.yaml"
    data = yaml.safe_load(path.read_text())
    for f in dataclasses.fields(Config):
        assert f.name in data, f"config.example.yaml lacks {f.name}"
        if dataclasses.is_dataclass(getattr(Config(), f.name)):
            section = getattr(Config(), f.name)
            names = {s.name for s in dataclasses.fields(section)}
            assert set(data[f.name]) == names, f"{f.name}: {set(data[f.name]) ^ names}"
    assert to_dict(load_config(str(path), environ={})) == to_dict(load_config(environ={}))


def test_seed_dotted_settings_map_onto_the_yaml(tmp_path):
    path = write(tmp_path, {
        "master": {"port": 7601, "redis_map": {0: "redis://127.0.0.1:6379/0", 3: {"host": "10.0.0.5", "port": 6380,
                                                                                   "db": 2}}},
        "worker": {"port": 7621, "master_hosts": ["127.0.0.1:7601", "PYRO:queue@10.0.0.1:7600"], "queue_index": 3,
                   "max_sleep": 2, "task_timeout": 30},
    })
    config = load_config(path, environ={})
    assert config.master.port == 7601
    assert config.master.redis_map == {0: "redis://127.0.0.1:6379/0", 3: "redis://10.0.0.5:6380/2"}
    assert (config.worker.port, config.worker.queue_index) == (7621, 3)
    assert config.worker.master_hosts == ["127.0.0.1:7601", "PYRO:queue@10.0.0.1:7600"]
    assert config.worker.max_sleep == 2.0 and isinstance(config.worker.max_sleep, float)
    assert config.worker.task_timeout == 30.0


@pytest.mark.parametrize(("data", "key"), [
    ({"bogus": 1}, "bogus"),
    ({"master": {"bogus": 1}}, "master.bogus"),
    ({"worker": {"concurency": 4}}, "worker.concurency"),
    ({"limits": {"max_payloads": 4}}, "limits.max_payloads"),
])
def test_unknown_key_is_an_error_naming_it(tmp_path, data, key):
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, data), environ={})
    assert key in str(excinfo.value)


@pytest.mark.parametrize(("data", "key"), [
    ({"master": {"port": "seventy"}}, "master.port"),
    ({"master": {"port": 70000}}, "master.port"),
    ({"master": {"port": True}}, "master.port"),
    ({"master": {"lease_timeout": 0}}, "master.lease_timeout"),
    ({"master": {"lease_timeout": "long"}}, "master.lease_timeout"),
    ({"master": {"allow_pickle": "yes"}}, "master.allow_pickle"),
    ({"master": {"appendfsync": "sometimes"}}, "master.appendfsync"),
    ({"master": "not a mapping"}, "master"),
    ({"worker": {"concurrency": -1}}, "worker.concurrency"),
    ({"worker": {"pool": "gevent"}}, "worker.pool"),
    ({"worker": {"master_hosts": 7600}}, "worker.master_hosts"),
    ({"worker": {"allowed_modules": [1, 2]}}, "worker.allowed_modules"),
    ({"worker": {"prefetch": -2}}, "worker.prefetch"),
    ({"worker": {"task_timeout": -3}}, "worker.task_timeout"),
    ({"log_level": "LOUD"}, "log_level"),
    ({"client": {"retry": 0}}, "client.retry"),
])
def test_wrong_type_or_range_is_an_error_naming_the_key(tmp_path, data, key):
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, data), environ={})
    assert key in str(excinfo.value)


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:6379/0",
    "127.0.0.1:6379",
    "redis://127.0.0.1:notaport/0",
    {"host": "h", "port": "6379"},
    {"host": "h", "colour": "red"},
    42,
])
def test_bad_redis_url_is_an_error_naming_the_key(tmp_path, target):
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, {"master": {"redis_map": {0: target}}}), environ={})
    assert "master.redis_map[0]" in str(excinfo.value)


def test_bad_queue_index_in_redis_map(tmp_path):
    for index in ("zero", -1):
        with pytest.raises(ConfigError) as excinfo:
            load_config(write(tmp_path, {"master": {"redis_map": {index: "redis://h:1/0"}}}), environ={})
        assert "master.redis_map" in str(excinfo.value)


def test_redis_url_forms():
    assert redis_url("k", "redis://h:1/2") == "redis://h:1/2"
    assert redis_url("k", "unix:///tmp/redis.sock") == "unix:///tmp/redis.sock"
    assert redis_url("k", {"host": "h"}) == "redis://h:6379/0"
    assert redis_url("k", {"host": "h", "port": 1, "db": 3, "password": "pw"}) == "redis://:pw@h:1/3"


def test_unreadable_or_invalid_yaml_names_the_file(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(str(tmp_path / "missing.yaml"), environ={})
    assert "missing.yaml" in str(excinfo.value)
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, "master: [unclosed", "broken.yaml"), environ={})
    assert "broken.yaml" in str(excinfo.value)
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, "- a list\n", "list.yaml"), environ={})
    assert "list.yaml" in str(excinfo.value)
    assert load_config(write(tmp_path, "", "empty.yaml"), environ={}) == load_config(environ={})


def test_env_variables_are_typed_and_checked(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    config = load_config(environ={"PPQ_MASTER_PORT": "7611", "PPQ_WORKER_ALLOWED_MODULES": "app,lib.tasks",
                                  "PPQ_WORKER_MAX_SLEEP": "0.5", "PPQ_AUTH_TOKEN": "12345",
                                  "PPQ_MASTER_ALLOW_PICKLE": "true", "PPQ_LOG_LEVEL": "debug",
                                  "PPQ_CONFIG": str(tmp_path / "empty.yaml"), "OTHER": "x"})
    assert config.master.port == 7611
    assert config.worker.allowed_modules == ["app", "lib.tasks"]
    assert config.worker.max_sleep == 0.5
    assert config.auth_token == "12345"  # kept as text, not read as a number
    assert config.master.allow_pickle is True
    assert config.log_level == "DEBUG"
    with pytest.raises(ConfigError) as excinfo:
        load_config(environ={"PPQ_MASTER_PROT": "1"})
    assert "PPQ_MASTER_PROT" in str(excinfo.value)
    with pytest.raises(ConfigError) as excinfo:
        load_config(environ={"PPQ_MASTER_PORT": "abc"})
    assert "master.port" in str(excinfo.value)
    assert env_overrides({"PPQ_WORKER_QUEUE_INDEX": "2"}) == {"worker.queue_index": 2}


def test_flag_overrides_env_overrides_yaml_overrides_default(tmp_path):
    path = write(tmp_path, {"master": {"port": 1111}, "worker": {"queue_index": 1, "max_sleep": 3}})
    env = {"PPQ_MASTER_PORT": "2222", "PPQ_WORKER_QUEUE_INDEX": "2"}
    flags = {"master.port": 3333}
    assert load_config(environ={}).master.port == 7600
    assert load_config(path, environ={}).master.port == 1111
    both = load_config(path, environ=env)
    assert (both.master.port, both.worker.queue_index, both.worker.max_sleep) == (2222, 2, 3.0)
    everything = load_config(path, overrides=flags, environ=env)
    assert (everything.master.port, everything.worker.queue_index, everything.worker.max_sleep) == (3333, 2, 3.0)
    # A flag not given (None) does not override anything.
    assert load_config(path, overrides={"master.port": None}, environ=env).master.port == 2222
    # Without the file, env still beats the default, and flags beat env.
    assert load_config(environ=env).master.port == 2222
    assert load_config(overrides=flags, environ=env).master.port == 3333


def test_config_is_frozen():
    config = load_config(environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.master.port = 1  # type: ignore[misc]


def test_ppq_config_names_the_file_when_no_path_is_given(tmp_path):
    path = tmp_path / "ppq.yaml"
    path.write_text("client:\n  masters: ['10.1.2.3:7600']\nworker:\n  queue_index: 4\n")
    config = load_config(environ={"PPQ_CONFIG": str(path)})
    assert config.client_masters() == ["10.1.2.3:7600"] and config.worker.queue_index == 4
    assert load_config(environ={}).worker.queue_index == 0


@pytest.mark.parametrize(("master", "expected"), [
    ({"port": 7655}, "127.0.0.1:7655"),
    ({"host": "0.0.0.0", "port": 7656}, "127.0.0.1:7656"),
    ({"host": "", "port": 7657}, "127.0.0.1:7657"),
    ({"host": "10.0.0.5"}, "10.0.0.5:7600"),
    ({"host": "::", "port": 7658}, "[::1]:7658"),
])
def test_clients_and_workers_default_to_the_configs_own_master(tmp_path, master, expected):
    config = load_config(write(tmp_path, {"master": master}), environ={})
    assert config.worker.master_hosts == [expected] and config.client_masters() == [expected]
    # The same when the port comes from the environment, and a copy with another port follows it.
    assert load_config(environ={"PPQ_MASTER_PORT": "7699"}).client_masters() == ["127.0.0.1:7699"]
    moved = dataclasses.replace(config, master=dataclasses.replace(config.master, port=7001, host="127.0.0.1"))
    assert moved.worker.master_hosts == ["127.0.0.1:7001"]
    # Given addresses are kept as they are.
    given = load_config(write(tmp_path, {"master": master, "worker": {"master_hosts": ["h:1"]}}), environ={})
    assert given.worker.master_hosts == ["h:1"]
    given = load_config(write(tmp_path, {"master": master, "client": {"masters": ["c:2"]}}), environ={})
    assert given.client_masters() == ["c:2"] and given.worker.master_hosts == [expected]


def test_redis_map_takes_the_seeds_host_port_db_list(tmp_path):
    path = write(tmp_path, "master:\n  redis_map: {0: ['127.0.0.1', 6379, 0], 2: [10.0.0.5, 6380, 3]}\n")
    assert load_config(path, environ={}).master.redis_map == {0: "redis://127.0.0.1:6379/0",
                                                               2: "redis://10.0.0.5:6380/3"}
    config = Config.from_settings({"master.redis_map": {0: ("127.0.0.1", 6379, 0)}, "master.port": 7600})
    assert config.master.redis_map == {0: "redis://127.0.0.1:6379/0"} and config.master.port == 7600
    for bad in (["127.0.0.1"], ["127.0.0.1", "6379", 0], ["h", 1, 2, "pw", "extra"]):
        with pytest.raises(ConfigError, match=r"master\.redis_map\[0\]"):
            load_config(write(tmp_path, {"master": {"redis_map": {0: bad}}}), environ={})


def test_from_settings_takes_dotted_keys_checked_like_the_yaml(tmp_path):
    settings = {"master.port": 7601, "master.redis_map": {0: ["127.0.0.1", 6379, 0]}, "worker.queue_index": 2,
                "worker.master_hosts": ["PYROLOC://127.0.0.1:7601/queue"], "worker.max_sleep": 2}
    config = Config.from_settings(settings)
    yaml_path = write(tmp_path, {"master": {"port": 7601, "redis_map": {0: ["127.0.0.1", 6379, 0]}},
                                 "worker": {"queue_index": 2, "master_hosts": ["PYROLOC://127.0.0.1:7601/queue"],
                                            "max_sleep": 2}})
    assert config == load_config(yaml_path, environ={})
    # Nested sections mix with dotted keys, in any order.
    assert Config.from_settings({"master.port": 1, "master": {"result_ttl": 5}}).master.port == 1
    # The environment is read only when asked for.
    assert Config.from_settings({"master.port": 1}, environ={"PPQ_MASTER_PORT": "2"}).master.port == 2
    assert Config.from_settings({"master.port": 1}).master.port == 1
    for bad, key in (({"master.prot": 1}, "master.prot"), ({"master.port": "x"}, "master.port"),
                     ({"master.redis_map": {0: "http://x"}}, "master.redis_map[0]"), ({"bogus": 1}, "bogus"),
                     ({"worker.concurrency": -1}, "worker.concurrency")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            Config.from_settings(bad)


@pytest.mark.parametrize(("address", "uri"), [
    ("PYROLOC://127.0.0.1:7600/queue", "PYRO:queue@127.0.0.1:7600"),
    ("PYROLOC://10.0.0.1:7601", "PYRO:queue@10.0.0.1:7601"),
    ("pyroloc://h:1/other", "PYRO:other@h:1"),
    ("127.0.0.1:7600", "PYRO:queue@127.0.0.1:7600"),
    ("[::1]:7600", "PYRO:queue@[::1]:7600"),
    ("PYRO:queue@h:2", "PYRO:queue@h:2"),
])
def test_master_addresses_in_every_form(address, uri):
    assert master_uri(address) == uri
    func = PyroFunc(address, retry=1, random_idx=True, threaded=True)
    assert func.uris == [uri]


@pytest.mark.parametrize("address", ["PYROLOC://127.0.0.1/queue", "PYROLOC://:7600/queue", "nohost", "h:port"])
def test_bad_master_addresses_are_refused(address):
    with pytest.raises(ConfigError, match="master address"):
        master_uri(address)


def test_env_typos_name_the_known_variable_and_other_ppq_names_warn_once(caplog):
    for typo, known in (("PPQ_MASTER_PROT", "PPQ_MASTER_PORT"), ("PPQ_AUTHTOKEN", "PPQ_AUTH_TOKEN"),
                        ("PPQ_WORKER_CONCURENCY", "PPQ_WORKER_CONCURRENCY"), ("PPQ_CONFG", "PPQ_CONFIG")):
        with pytest.raises(ConfigError, match=f"unknown environment variable {typo}: did you mean {known}"):
            load_config(environ={typo: "1"})
    with caplog.at_level("WARNING", logger="ppq.config"):
        for _ in range(3):
            config = load_config(environ={"PPQ_PROJECT_ONCE": "/x", "PPQ_MASTER_PORT": "7612"})
    assert config.master.port == 7612
    warnings = [r.getMessage() for r in caplog.records if "PPQ_PROJECT_ONCE" in r.getMessage()]
    assert len(warnings) == 1 and "not a ppq setting" in warnings[0]


def test_unknown_yaml_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match=r"'master.prot' \(did you mean master.port\?\)"):
        load_config(write(tmp_path, {"master": {"prot": 1}}), environ={})

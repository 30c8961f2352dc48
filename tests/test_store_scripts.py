"""The Lua scripts under ppq/store/lua/: each file's documented contract, how fragments are
included, that every assembled script compiles in a real Redis and is reloaded after a
SCRIPT FLUSH, and that the files ship with the package."""

from __future__ import annotations

import ast
import fnmatch
import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

import ppq.store
from ppq.errors import StorageError
from ppq.store import Store
from ppq.store.scripts import INCLUDE, NAMES, SOURCES, read

PACKAGE = Path(ppq.store.__file__).resolve().parent
LUA = PACKAGE / "lua"
FILES = sorted(path.name for path in LUA.glob("*.lua"))
FRAGMENTS = sorted(set(FILES) - {name + ".lua" for name in NAMES})
INDEX = re.compile(r"\b(KEYS|ARGV)\[(\d+)\]")
# Top-level local declarations: "local a, b = ..." and "local function f(".
DECLARED = re.compile(r"^local\s+(?:function\s+(\w+)|([\w\s,]+?)\s*(?:=|$))", re.MULTILINE)


def split(text: str) -> tuple[str, str]:
    """A file's opening comment block (its header) and the rest."""
    lines = text.split("\n")
    end = next(i for i, line in enumerate(lines) if not line.startswith("--"))
    return "\n".join(lines[:end]), "\n".join(lines[end:])


def entries(header: str, label: str) -> list[str]:
    """The names a fragment's header lists under ``label`` ("Expects" or "Sets"): the first
    column of each entry; an entry's text starts where the text after the label does, and
    its wrapped lines start further right."""
    names: list[str] = []
    column = 0
    inside = False
    for line in header.split("\n"):
        text = line[3:]
        found = re.match(r"(\w+):\s+", text)
        if found:
            inside, column = found.group(1) == label, found.end()
        elif not text.strip() or text[:column].strip():
            inside = False
        if inside and len(text) > column and text[column] != " ":
            first = re.split(r"\s{2,}", text[column:].strip())[0]
            names += [name.strip() for name in first.split(",") if name.strip() != "nothing."]
    return names


def declared(body: str) -> set[str]:
    out: set[str] = set()
    for function, names in DECLARED.findall(body):
        out |= {function} if function else {n.strip() for n in names.split(",")}
    return out


def test_every_file_is_a_script_the_store_runs_or_a_fragment_one_includes():
    included = {name for script in NAMES for name in INCLUDE.findall(read(script + ".lua"))}
    assert {name + ".lua" for name in NAMES} <= set(FILES)
    assert set(FRAGMENTS) == included, "a .lua file that is neither run nor included"
    assert FRAGMENTS == ["expire.lua", "lease.lua", "limits.lua", "module.lua", "now.lua", "ready.lua", "seen.lua",
                         "workflow.lua"]


@pytest.mark.parametrize("filename", FILES)
def test_the_header_names_every_keys_and_argv_index_the_body_uses(filename):
    header, body = split(read(filename))
    used = sorted(set(INDEX.findall(body)))
    missing = [f"{kind}[{n}]" for kind, n in used if f"{kind}[{n}]" not in header]
    assert not missing, f"{filename}: the header does not document {missing}"
    if filename in FRAGMENTS:
        assert not used, f"{filename}: a fragment reads the locals its script sets, never KEYS or ARGV"
        return
    assert used, filename
    assert re.search(r"^-- KEYS", header, re.MULTILINE), f"{filename}: the header says nothing of KEYS"
    assert re.search(r"^-- Returns", header, re.MULTILINE), f"{filename}: the header says nothing of what it returns"
    if re.search(r"#ARGV|ARGV\[i", body):
        # Values read in a loop past the fixed ones: the header says where they start and what they are.
        assert re.search(r"ARGV\[\d+\]\.\.\.", header), f"{filename}: the repeated ARGV values are not documented"


@pytest.mark.parametrize("fragment", FRAGMENTS)
def test_a_fragment_documents_what_it_expects_and_sets_and_its_scripts_provide_it(fragment):
    header, body = split(read(fragment))
    expects, sets = entries(header, "Expects"), entries(header, "Sets")
    assert "Expects:" in header and sets, fragment
    assert set(sets) <= declared(body), f"{fragment}: it does not set {set(sets) - declared(body)}"
    assert not set(expects) & declared(body), f"{fragment}: it declares what it expects"
    for script in NAMES:
        text = read(script + ".lua")
        marker = f"-- include: {fragment}\n"
        if marker not in text:
            continue
        before = text[:text.index(marker)]
        provided = declared(before)
        for earlier in INCLUDE.findall(before):
            provided |= set(entries(split(read(earlier))[0], "Sets"))
        assert set(expects) <= provided, f"{script}.lua includes {fragment} before setting {set(expects) - provided}"


def test_the_fragment_headers_are_read_as_documented():
    assert entries(split(read("lease.lua"))[0], "Expects") == ["P", "wid", "count", "lt", "nonce", "allow",
                                                               "target_of", "use_limits", "load_limits", "room",
                                                               "admit", "hold", "hold_flush", "now", "module_of",
                                                               "expire"]
    assert entries(split(read("lease.lua"))[0], "Sets") == ["out", "more"]
    assert entries(split(read("limits.lua"))[0], "Sets") == ["use_limits", "load_limits", "room", "admit", "hold",
                                                             "hold_flush", "free_slot"]
    assert entries(split(read("now.lua"))[0], "Expects") == []
    assert entries(split(read("seen.lua"))[0], "Sets") == ["mark_seen"]
    assert entries(split(read("module.lua"))[0], "Sets") == ["module_of", "target_of", "msgpack_str", "byte", "sub"]


@pytest.mark.parametrize("name", NAMES)
def test_an_assembled_script_holds_its_fragments_in_place_of_its_include_lines(name):
    source = SOURCES[name]
    assert not INCLUDE.search(source)
    for fragment in INCLUDE.findall(read(name + ".lua")):
        assert read(fragment).rstrip("\n") in source
    assert source.count("\n") >= read(name + ".lua").count("\n")


def test_every_script_compiles_in_redis_under_the_sha_the_store_runs(redis_a, ra):
    store = Store(0, redis_a.url)
    try:
        for name in NAMES:
            sha = hashlib.sha1(SOURCES[name].encode()).hexdigest()
            assert getattr(store, "_" + name).sha == sha
            assert ra.script_load(SOURCES[name]) == sha, name
    finally:
        store.close()


@pytest.mark.parametrize("query", ["", "?health_check_interval=0"], ids=["link", "redis-py"])
def test_a_store_reloads_its_scripts_after_a_script_flush(redis_a, ra, query):
    store = Store(0, redis_a.url + query)
    try:
        assert (store._link is None) == bool(query)
        assert store.move_due()[0] == 0
        sha = store._move.sha
        assert ra.script_exists(sha) == [True]
        ra.script_flush()
        assert ra.script_exists(sha) == [False]
        moved, next_eta, now = store.move_due()
        assert (moved, next_eta) == (0, None) and now > 0
        assert ra.script_exists(sha) == [True]
    finally:
        store.close()


def commands_sent(client: redis.Redis, action: Callable[[], Any]) -> list[str]:
    """The commands other clients sent the server while ``action`` ran (not those scripts ran), in order."""
    with client.monitor() as monitor:
        action()
        client.echo("end of action")
        sent: list[tuple[tuple[str, str], str]] = []
        while True:
            command = monitor.next_command()
            if command["client_type"] == "lua":
                continue
            client_of = (command["client_address"], command["client_port"])
            if command["command"] == "ECHO end of action":
                return [name for who, name in sent if who != client_of]  # not the test's own client
            sent.append((client_of, command["command"].split()[0].upper()))


@pytest.mark.parametrize("wait", [0, 1], ids=["plain", "wait_replicas"])
def test_a_plain_redis_store_sends_one_evalsha_per_script_and_a_wait_only_when_asked(redis_a, ra, wait):
    """On one Redis with no Sentinel, cluster or redis.wait_replicas, a script is one EVALSHA and
    nothing more; with wait_replicas, one WAIT rides along (and, with no replica here, the call
    fails as unconfirmed while the primary keeps the change)."""
    store = Store(0, redis_a.url, wait_replicas=wait, wait_timeout=0.05)
    try:
        store.move_due()  # the connection is open and the scripts loaded
        ra.script_load(SOURCES["pause"])

        def calls() -> None:
            for _ in range(5):
                store.move_due()
            if wait:
                with pytest.raises(StorageError, match=r"only 0 of the 1 replicas redis\.wait_replicas asks for"):
                    store.pause()
            else:
                assert store.pause() == 1

        assert commands_sent(ra, calls) == ["EVALSHA"] * 6 + (["WAIT"] if wait else [])
        assert store.paused().keys() == {"queue"}
    finally:
        store.close()


def toml_list(text: str, section: str, key: str) -> list[str]:
    """A one-line list of strings from pyproject.toml (Python 3.10 has no tomllib)."""
    body = text.split(f"\n[{section}]\n", 1)[1].split("\n[", 1)[0]
    found = re.search(rf"^{re.escape(key)}\s*=\s*(\[.*\])\s*$", body, re.MULTILINE)
    assert found, f"pyproject.toml: no {key} under [{section}]"
    return list(ast.literal_eval(found.group(1)))


def test_the_lua_files_are_package_data():
    text = (PACKAGE.parent.parent / "pyproject.toml").read_text()
    packages = toml_list(text, "tool.setuptools.packages.find", "include")
    assert any(fnmatch.fnmatch("ppq.store", pattern) for pattern in packages)
    patterns = toml_list(text, "tool.setuptools.package-data", "ppq")
    assert FILES
    for filename in FILES:
        relative = f"store/lua/{filename}"
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), f"{relative} would not ship"

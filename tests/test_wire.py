"""The wire layer on its own: bounded decoders, roles, and a Pyro5 left as it was found."""

from __future__ import annotations

import marshal
import struct
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppq.errors import AuthError
from ppq.rpc import make_proxy, wire

from .conftest import REPO

# -- marshal: checked before it is loaded ---------------------------------------------------

plain = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children) | st.tuples(children, children),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(plain)
def test_check_marshal_accepts_what_marshal_writes(value):
    data = marshal.dumps(value)
    wire.check_marshal(data)
    assert wire.loads(wire.MARSHAL, data) == value


def test_check_marshal_accepts_shared_references_within_budget():
    item = ["shared" * 3]
    data = marshal.dumps([item, item, item, {"k": item}])
    wire.check_marshal(data)


@pytest.mark.parametrize("data, words", [
    (b"(" + struct.pack("<i", 2**28), "more bytes than it holds"),
    (b"[" + struct.pack("<i", 2**31 - 1), "more bytes than it holds"),
    (b"u" + struct.pack("<i", 2**30) + b"abc", "more bytes than it holds"),
    (b"c" + b"\x00" * 40, "not accepted"),
    (b"\xdb" + struct.pack("<i", 1) + b"r" + struct.pack("<i", 0), "not finished"),
    (b"[" * 1 + struct.pack("<i", 1) + b"N" + b"N", "trailing"),
    (b"r" + struct.pack("<i", 5), "not finished"),
])
def test_check_marshal_refuses(data, words):
    with pytest.raises(wire.WireError, match=words):
        wire.check_marshal(data)


def test_check_marshal_refuses_expanding_back_references():
    # Level k is a list of 8 references to level k-1: 2 KB that a walk would expand to 8**20 items.
    out = bytearray(b"\xdb" + struct.pack("<i", 1) + b"\xe9" + struct.pack("<i", 7))  # refs[0]=list, refs[1]=7
    for level in range(2, 22):
        out += b"\xdb" + struct.pack("<i", 8)
        out += (b"r" + struct.pack("<i", level - 1 if level > 2 else 1)) * 8
    data = bytes(out)
    assert len(data) < 2100
    with pytest.raises(wire.WireError):
        wire.check_marshal(data)


def test_check_marshal_takes_what_marshal_takes_and_refuses_deeper_nesting():
    nested = None
    for _ in range(1900):
        nested = [nested]
    wire.check_marshal(marshal.dumps(nested))
    with pytest.raises(wire.WireError, match="nests deeper"):
        wire.check_marshal(b"[" + struct.pack("<i", 1) + b")\x01" * 2100 + b"N" + b"N" * 20000)
    assert wire.loads(wire.MARSHAL, marshal.dumps({})) == {}
    assert wire.loads(wire.MARSHAL, marshal.dumps([{}, {"a": {}}, []])) == [{}, {"a": {}}, []]


def test_msgpack_lengths_are_bounded_by_the_input():
    with pytest.raises(wire.WireError):
        wire.unpack(b"\xdd" + struct.pack(">I", 2**31))
    with pytest.raises(wire.WireError, match="nests too deeply"):
        wire.unpack(b"\x91" * 5000 + b"\xc0")


def test_text_nesting_is_refused_before_parsing():
    with pytest.raises(wire.WireError, match="nests deeper"):
        wire.loads(wire.JSON, b"[" * 5000 + b"]" * 5000)
    assert wire.loads(wire.JSON, b'["[[[[", {"a": [1]}]') == ["[[[[", {"a": [1]}]


def test_compressed_messages_are_refused():
    head = wire.HEADER.pack(wire.TAG, wire.PROTOCOL, wire.MSG_CONNECT, wire.MSGPACK, wire.FLAGS_COMPRESSED, 0,
                            10, 0, wire.NO_CORRELATION, 0, wire.MAGIC)
    with pytest.raises(wire.WireError, match="compressed"):
        wire.parse_header(head)


# -- roles -----------------------------------------------------------------------------------

def test_split_tokens_keep_clients_and_workers_to_their_methods(make_master):
    server = make_master(auth_token="all-of-it", worker_token="w-token", client_token="c-token")
    client = make_proxy(server.uri, token="c-token")
    worker = make_proxy(server.uri, token="w-token")
    admin = make_proxy(server.uri, token="all-of-it")
    try:
        task_id = client.push_task("add", module="tasks", args=[1, 2])
        for method, args in (("get_task", ({"id": "w1"}, 0)), ("get_tasks", ({"id": "w1"}, 0, 5)),
                             ("report", ({"id": "w1"}, 0, [], 1)), ("heartbeat", ({"id": "w1"}, 0, [])),
                             ("task_finish", (task_id, {"id": "w1"}, 0)),
                             ("task_error", (task_id, {"id": "w1"}, 0))):
            with pytest.raises(AuthError, match="for workers"):
                getattr(client, method)(*args)
        for method, args in (("push_task", ("add",)), ("push_tasks", ([],)), ("cancel_task", (task_id,)),
                             ("requeue_dead", (None,)), ("purge_dead", (None,)), ("get_task_info", (task_id,))):
            with pytest.raises(AuthError, match="for clients"):
                getattr(worker, method)(*args)
        assert client.get_task_info(task_id)["state"] == "queued"
        assert worker.ping() == "pong" and client.ping() == "pong"
        assert 0 in worker.server_info()
        leased = worker.get_task({"id": "w1"}, 0)
        assert leased["id"] == task_id
        assert admin.get_task_info(task_id)["state"] == "running"
    finally:
        for proxy in (client, worker, admin):
            proxy._pyroRelease()


def test_a_wrong_token_is_refused_and_a_right_one_still_gets_in(make_master):
    server = make_master(worker_token="w-token", client_token="c-token")
    with pytest.raises(AuthError):
        from ppq.rpc import PyroFunc

        PyroFunc(server.uri, token="nope")("ping")
    assert make_proxy(server.uri, token="c-token").ping() == "pong"


def test_importing_ppq_leaves_pyro5_as_it_was():
    """A plain Pyro5 user in the same process sees Pyro5's own serializers and settings."""
    code = """
import Pyro5.api, Pyro5.serializers as s
from Pyro5 import config as c
before = (s.SerializerBase.dict_to_class, {n: (type(x).loads, type(x).loadsCall) for n, x in s.serializers.items()},
          {n: (x.__dict__.get('loads'), x.__dict__.get('loadsCall')) for n, x in s.serializers.items()},
          c.SERIALIZER, c.SERVERTYPE, c.THREADPOOL_SIZE, c.COMMTIMEOUT, c.MAX_MESSAGE_SIZE, c.SSL)
import ppq, ppq.rpc, ppq.client, ppq.master, ppq.worker
from ppq import Client, PyroFunc
PyroFunc('127.0.0.1:1')
after = (s.SerializerBase.dict_to_class, {n: (type(x).loads, type(x).loadsCall) for n, x in s.serializers.items()},
         {n: (x.__dict__.get('loads'), x.__dict__.get('loadsCall')) for n, x in s.serializers.items()},
         c.SERIALIZER, c.SERVERTYPE, c.THREADPOOL_SIZE, c.COMMTIMEOUT, c.MAX_MESSAGE_SIZE, c.SSL)
assert before == after, (before, after)
print("same")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert out.stdout.strip() == "same", out.stderr


def test_serpent_requests_are_bounded_by_their_values():
    """serpent text is parsed through Python's AST, hundreds of bytes a value: a request of too
    many values is refused before it is parsed; a modest one is read."""
    with pytest.raises(wire.WireError, match="serpent request of more than"):
        wire.check_text(wire.SERPENT, b"[" + b"0," * (wire.MAX_TEXT_ITEMS + 1) + b"]")
    assert wire.loads(wire.SERPENT, b"[" + b"0," * 1000 + b"]") == [0] * 1000

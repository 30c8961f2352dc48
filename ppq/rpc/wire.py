"""Pyro5's wire format, read with limits.

Every message is a 40-byte header (tag, protocol version, type, serializer, flags,
sequence, data size, annotations size, correlation id, reserved, magic), then the
annotations, then the serialized data. This module reads it without trusting it:
sizes are checked against the caller's limit before anything is read, compressed
messages are refused (ppq never compresses, and inflating is unbounded), and data
is decoded only by decoders that cannot be made to allocate more than a small
multiple of the bytes received:

- msgpack (ppq's own serializer): containers are bounded by the input's length,
  and there are no back-references;
- marshal (a plain Pyro5 proxy may choose it): checked by :func:`check_marshal`
  first, which refuses declared lengths beyond the bytes present, back-references
  that would expand past a budget or point into an unfinished container, code
  objects, and deep nesting;
- serpent and json: text, parsed by bounded parsers; their size is capped lower.

No Pyro5 class walk runs on data read here.
"""

from __future__ import annotations

import ast
import json
import struct
from typing import Any, NamedTuple

import msgpack

# Pyro5 message header: tag, version, type, serializer, flags, seq, data size,
# annotations size, correlation id, reserved, magic.
HEADER = struct.Struct("!4sHBBHHII16sHH")
TAG = b"PYRO"
PROTOCOL = 502
MAGIC = 0x4DC5
NO_CORRELATION = bytes(16)

MSG_CONNECT = 1
MSG_CONNECTOK = 2
MSG_CONNECTFAIL = 3
MSG_INVOKE = 4
MSG_RESULT = 5
MSG_PING = 6

FLAGS_EXCEPTION = 1 << 0
FLAGS_COMPRESSED = 1 << 1
FLAGS_ONEWAY = 1 << 2
FLAGS_BATCH = 1 << 3
FLAGS_ITEMSTREAMRESULT = 1 << 4
FLAGS_KEEPSERIALIZED = 1 << 5
FLAGS_CORR_ID = 1 << 6

SERPENT = 1
MARSHAL = 2
JSON = 3
MSGPACK = 4
SERIALIZER_NAMES = {SERPENT: "serpent", JSON: "json", MARSHAL: "marshal", MSGPACK: "msgpack"}

# Largest handshake (annotations and data together) read before the token is checked, in bytes.
MAX_HANDSHAKE = 4096
# Deepest nesting accepted in a serpent or json message (their parsers recurse).
MAX_DEPTH = 200
# Most values (counted by their separators) in a serpent request.
MAX_TEXT_ITEMS = 20_000
# Requests up to this size are decoded without counting their containers.
SMALL = 256 * 1024
# At most one list or dict per this many bytes of a larger request.
CONTAINER_BYTES = 8
# Deepest nesting accepted in a marshal message: marshal's own limit.
MAX_MARSHAL_DEPTH = 2000


class WireError(Exception):
    """A message that ppq refuses to read; the connection is closed."""


class Header(NamedTuple):
    kind: int
    serializer_id: int
    flags: int
    seq: int
    size: int
    annotations: int


def parse_header(data: bytes) -> Header:
    """The header's fields; WireError if it is not a Pyro5 message of this protocol."""
    if len(data) != HEADER.size:
        raise WireError("truncated header")
    tag, version, kind, serializer_id, flags, seq, size, annotations, _, _, magic = HEADER.unpack(data)
    if tag != TAG or version != PROTOCOL or magic != MAGIC:
        raise WireError("not a Pyro5 message of protocol 502")
    if flags & FLAGS_COMPRESSED:
        raise WireError("compressed messages are not accepted")
    return Header(kind, serializer_id, flags, seq, size, annotations)


def message(kind: int, serializer_id: int, seq: int, data: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(TAG, PROTOCOL, kind, serializer_id, flags, seq, len(data), 0, NO_CORRELATION, 0,
                       MAGIC) + data


_CHUNK = struct.Struct("!4sI")


def check_annotations(data: bytes) -> None:
    """Pyro5's annotation chunks (4 ASCII letters, a length, the bytes): each must fit, and
    none may be a blob (``BLBI``), which Pyro5 would unmarshal unchecked."""
    pos = 0
    while pos < len(data):
        if pos + _CHUNK.size > len(data):
            raise WireError("truncated annotation")
        key, size = _CHUNK.unpack_from(data, pos)
        pos += _CHUNK.size + size
        if pos > len(data) or not key.isascii() or not key.isalnum():
            raise WireError("malformed annotation")
        if key == b"BLBI":
            raise WireError("blob annotations are not accepted")


def unpack(data: bytes) -> Any:
    """msgpack data as ppq sends it: bytes stay bytes, int map keys allowed. Every length
    is bounded by the input's (msgpack's default), so nothing allocates far past it, and
    past SMALL bytes the containers are counted: at most one per CONTAINER_BYTES of input
    (an empty list is one byte on the wire and some sixty in memory)."""
    try:
        if len(data) <= SMALL:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        hook = _container_counter(len(data))
        return msgpack.unpackb(data, raw=False, strict_map_key=False, object_hook=hook, list_hook=hook)
    except msgpack.StackError:
        raise WireError("an argument nests too deeply") from None
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise WireError(f"bad msgpack data: {exc}") from None


def _container_counter(size: int) -> Any:
    limit = size // CONTAINER_BYTES + 1024
    count = 0

    def counted(value: Any) -> Any:
        nonlocal count
        count += 1
        if count > limit:
            raise WireError(f"a request of {size} bytes holds more than {limit} lists and dicts")
        return value

    return counted


def loads(serializer_id: int, data: bytes) -> Any:
    """Decode ``data`` with the bounded decoder of its serializer, as plain data (no objects
    are made from class dicts)."""
    if serializer_id == MSGPACK:
        return unpack(data)
    if serializer_id == MARSHAL:
        import marshal

        check_marshal(data)
        try:
            return marshal.loads(data)
        except (ValueError, EOFError, TypeError) as exc:
            raise WireError(f"bad marshal data: {exc}") from None
    if serializer_id in (SERPENT, JSON):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise WireError("text message is not UTF-8") from None
        check_text(serializer_id, data)
        try:
            if serializer_id == JSON:
                return json.loads(text)
            if text.startswith("#"):
                # serpent's header comment line ("# serpent utf-8 python3.2")
                text = text.split("\n", 1)[1] if "\n" in text else ""
            return ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
            raise WireError(f"bad {SERIALIZER_NAMES[serializer_id]} data: {type(exc).__name__}") from None
    raise WireError(f"unknown serializer id {serializer_id}")


def check_text(serializer_id: int, data: bytes) -> None:
    """Refuse serpent or json text that a parser would turn into far more memory than its size:
    nesting deeper than MAX_DEPTH, or (serpent, parsed through Python's AST at some hundreds
    of bytes a value) more than MAX_TEXT_ITEMS values."""
    if serializer_id == SERPENT and data.count(b",") + data.count(b":") > MAX_TEXT_ITEMS:
        raise WireError(f"a serpent request of more than {MAX_TEXT_ITEMS} values; send large data with "
                        f"msgpack or marshal")
    _check_text_depth(data.decode("utf-8", "replace"))


def _check_text_depth(text: str) -> None:
    """Refuse text that opens more than MAX_DEPTH brackets at once (before any parser recurses)."""
    depth = 0
    if text.count("[") + text.count("{") + text.count("(") <= MAX_DEPTH:
        return
    in_string = ""
    escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == in_string:
                in_string = ""
        elif ch in "\"'":
            in_string = ch
        elif ch in "[{(":
            depth += 1
            if depth > MAX_DEPTH:
                raise WireError(f"an argument nests deeper than {MAX_DEPTH} levels")
        elif ch in "]})":
            depth -= 1


# marshal type codes (Python/marshal.c) -> size of a fixed payload.
_FIXED = {ord("N"): 0, ord("F"): 0, ord("T"): 0, ord("S"): 0, ord("."): 0, ord("i"): 4, ord("g"): 8,
          ord("y"): 16}
_LEN32 = frozenset(map(ord, "stuaA"))
_LEN8 = frozenset(map(ord, "zZ"))
_SEQ32 = frozenset(map(ord, "([<>"))
_SMALL_TUPLE = ord(")")
_DICT = ord("{")
_NULL = ord("0")
_REF = ord("r")
_LONG = ord("l")
_FLOAT = ord("f")
_COMPLEX = ord("x")
_FLAG_REF = 0x80
_INT32 = struct.Struct("<i")


def check_marshal(data: bytes, max_depth: int = MAX_MARSHAL_DEPTH) -> None:
    """Walk marshal ``data`` without building anything; raise WireError unless it is safe
    for ``marshal.loads`` and for walking what that returns.

    Refused: a declared count or length larger than the bytes left (marshal allocates
    first, then reads), a back-reference to a container still being read (a cycle) or
    one that makes the data, expanded, larger than a small multiple of its size, code
    objects and unknown types, nesting deeper than ``max_depth``, trailing bytes.
    Iterative, so that nesting costs no Python recursion.
    """
    end = len(data)
    budget = 4 * end + 4096
    refs: list[int | None] = []
    expanded = 0
    pos = 0
    # Open containers: [items left (-1: a dict, read until its NULL), weight so far, ref slot].
    stack: list[list[int]] = []
    containers = 0
    max_containers = end // CONTAINER_BYTES + 1024

    def need(n: int) -> None:
        if n < 0 or pos + n > end:
            raise WireError("marshal data declares more bytes than it holds")

    def close(weight: int) -> bool:
        """An object of ``weight`` is complete: add it to its container, closing the containers
        it completes; True when the outermost object is complete."""
        nonlocal pos
        while stack:
            top = stack[-1]
            top[1] += weight
            if top[0] > 0:
                top[0] -= 1
                if top[0]:
                    return False
            elif pos < end and data[pos] == _NULL:
                pos += 1
            else:
                return False
            stack.pop()
            weight = top[1]
            if top[2] >= 0:
                refs[top[2]] = weight
        return True

    while True:
        if stack and stack[-1][0] == -1 and pos < end and data[pos] == _NULL:
            # An empty dict.
            pos += 1
            top = stack.pop()
            if top[2] >= 0:
                refs[top[2]] = top[1]
            if close(top[1]):
                break
            continue
        if len(stack) > max_depth:
            raise WireError(f"an argument nests deeper than {max_depth} levels")
        need(1)
        code = data[pos]
        pos += 1
        slot = -1
        if code & _FLAG_REF:
            slot = len(refs)
            refs.append(None)
        code &= ~_FLAG_REF
        weight = 1
        items = 0
        if code in _FIXED:
            need(_FIXED[code])
            pos += _FIXED[code]
        elif code in _LEN32 or code == _LONG:
            need(4)
            (n,) = _INT32.unpack_from(data, pos)
            pos += 4
            n = 2 * abs(n) if code == _LONG else n
            need(n)
            pos += n
            weight += n // 8
        elif code in _LEN8:
            need(1)
            n = data[pos]
            need(n + 1)
            pos += n + 1
            weight += n // 8
        elif code in (_FLOAT, _COMPLEX):
            for _ in range(2 if code == _COMPLEX else 1):
                need(1)
                n = data[pos]
                need(n + 1)
                pos += n + 1
        elif code in _SEQ32 or code == _SMALL_TUPLE:
            if code == _SMALL_TUPLE:
                need(1)
                items = data[pos]
                pos += 1
            else:
                need(4)
                (items,) = _INT32.unpack_from(data, pos)
                pos += 4
            # Every item takes at least one byte: a count beyond the bytes left is a lie.
            need(items)
        elif code == _DICT:
            items = -1
        elif code == _REF:
            need(4)
            (index,) = _INT32.unpack_from(data, pos)
            pos += 4
            if not 0 <= index < len(refs) or refs[index] is None:
                raise WireError("marshal data refers to an object it has not finished")
            weight = refs[index]
            expanded += weight
            if expanded > budget:
                raise WireError("marshal data expands past its size through back-references")
        else:
            raise WireError(f"marshal type {chr(code)!r} is not accepted")
        if items:
            containers += 1
            if containers > max_containers:
                raise WireError(f"a request of {end} bytes holds more than {max_containers} containers")
            stack.append([items, weight, slot])
            continue
        if slot >= 0:
            refs[slot] = weight
        if close(weight):
            break
    if pos != end:
        raise WireError("trailing bytes after the marshal data")


def find_class_dict(value: Any, limit: int = 1_000_000) -> str | None:
    """The ``__class__`` value of the first dict in ``value`` that has that key, if any
    (serpent's floats aside).

    Pyro5 would make an object of such a dict; ppq takes arguments as plain data only.
    Iterative, and stops after ``limit`` values.
    """
    stack = [value]
    seen = 0
    while stack and seen < limit:
        item = stack.pop()
        seen += 1
        if isinstance(item, dict):
            # serpent writes nan and inf as {"__class__": "float", "value": ...}: a number, not an object.
            if "__class__" in item and item["__class__"] != "float":
                return str(item["__class__"])[:80]
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return None

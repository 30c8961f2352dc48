"""Payload encoding for task parameters and results.

The default codec is msgpack: JSON-like data (None, bool, int, float, str, list,
dict) plus bytes, compact and fast. Tuples come back as lists. JSON text is
accepted for parameters too, for outside clients that cannot send msgpack.

Pickle carries any Python object and therefore runs code on load; it is used only
where both ends opt in (``allow_pickle``). A pickled payload is recognised by its
whole framing (see :func:`is_pickle`) and refused everywhere else.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import pickle
import pickletools
import threading
from typing import Any

import msgpack

from .errors import CodecError

_JSON_START = frozenset(b"[{ \t\r\n")


def is_pickle(data: bytes) -> bool:
    """True if ``data`` is a pickle of protocol 2 to 5, by its framing.

    A PROTO opcode first, then opcodes that walk cleanly (read by
    :func:`pickletools.genops`, which runs nothing) up to a STOP at the last
    byte. The first and last bytes are looked at first, so data that is no
    pickle (msgpack never starts with PROTO and ends with STOP) costs nothing;
    a walk costs about 2 µs per opcode.
    """
    if len(data) < 3 or data[0] != 0x80 or not 2 <= data[1] <= 5 or data[-1] != 0x2E:
        return False
    try:
        last = collections.deque(pickletools.genops(data), maxlen=1)
    except Exception:  # noqa: BLE001 - a bad opcode, a truncated argument: not a pickle
        return False
    # genops stops at the first STOP: it must be the last byte.
    return bool(last) and last[0][0].name == "STOP" and last[0][2] == len(data) - 1


_packers = threading.local()


def pack(obj: Any) -> bytes:
    """msgpack ``obj`` with this thread's packer (making one per call costs more than packing small data)."""
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    try:
        return packer.pack(obj)
    except (TypeError, ValueError, OverflowError) as exc:
        packer.reset()
        raise CodecError(_why_not(obj, exc)) from None


def encode(obj: Any, use_pickle: bool = False) -> bytes:
    """Encode ``obj``; with ``use_pickle`` fall back to pickle for non JSON-like data."""
    try:
        return pack(obj)
    except CodecError:
        if use_pickle:
            return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        raise


# Deepest nesting of lists and dicts msgpack packs (its own recursion limit).
MAX_DEPTH = 1024
# What _offender returns for data nested deeper than MAX_DEPTH.
_TOO_DEEP = object()


def _offender(obj: Any) -> Any:
    """The first value inside ``obj`` that msgpack cannot carry, or ``_TOO_DEEP``; None if none is found.

    A walk with its own stack, not recursion: the data may be nested as deep as a caller likes.
    """
    stack = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            if depth >= MAX_DEPTH:
                return _TOO_DEEP
            children = [x for kv in item.items() for x in kv] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in reversed(children))
            continue
        try:
            msgpack.packb(item, use_bin_type=True)
        except (TypeError, ValueError, OverflowError):
            return item
    return None


def _why_not(obj: Any, exc: BaseException) -> str:
    """Why msgpack refused ``obj``, naming the offending value's type."""
    found = _offender(obj)
    if found is _TOO_DEEP:
        return f"the data is nested deeper than {MAX_DEPTH} levels of lists and dicts"
    if isinstance(found, int) and not isinstance(found, bool):
        return f"an integer of {found.bit_length()} bits does not fit in the 64 bits the default codec carries"
    if found is None:
        return f"cannot encode the data: {exc}"
    return (f"cannot encode a value of type {type(found).__name__}: the default codec carries JSON-like data "
            f"and bytes ({exc})")


def decode(data: bytes, allow_pickle: bool = False, setting: str = "allow_pickle") -> Any:
    """Decode what :func:`encode` made; ``setting`` names the option that enables pickle here."""
    if is_pickle(data):
        if not allow_pickle:
            raise CodecError(f"payload is a pickle, and pickle is not enabled here ({setting} is false)")
        try:
            return pickle.loads(data)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad payload
            raise CodecError(f"cannot unpickle payload: {exc}") from None
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - msgpack raises many types
        raise CodecError(f"payload is not valid msgpack: {exc}") from None


def encode_parameters(args: Any = (), kwargs: Any = None, use_pickle: bool = False) -> bytes:
    """Encode the ``(args, kwargs)`` pair that ``push_task(parameters=...)`` takes."""
    return encode([list(args), dict(kwargs or {})], use_pickle=use_pickle)


def decode_parameters(data: bytes, allow_pickle: bool = False,
                      setting: str = "allow_pickle") -> tuple[list[Any], dict[str, Any]]:
    """Decode and check an ``(args, kwargs)`` pair; ``setting`` as for :func:`decode`."""
    if data[:1] and data[0] in _JSON_START:
        try:
            pair = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CodecError(f"parameters: not valid JSON: {exc}") from None
        except RecursionError:
            raise CodecError("parameters: the JSON text is nested too deep") from None
    else:
        try:
            pair = decode(data, allow_pickle=allow_pickle, setting=setting)
        except CodecError as exc:
            raise CodecError(f"parameters: {exc}") from None
    if isinstance(pair, tuple):
        pair = list(pair)
    if not isinstance(pair, list) or len(pair) != 2:
        raise CodecError("parameters: expected an (args, kwargs) pair")
    args, kwargs = pair
    if isinstance(args, tuple):
        args = list(args)
    if not isinstance(args, list):
        raise CodecError(f"parameters: args must be a list, got {type(args).__name__}")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise CodecError("parameters: kwargs must be a dict with string keys")
    return args, kwargs


def from_wire(value: Any) -> bytes:
    """Bytes as any Pyro5 serializer delivers them: raw, serpent's base64 dict, or JSON text."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict) and value.get("encoding") == "base64" and isinstance(value.get("data"), str):
        try:
            return base64.b64decode(value["data"], validate=True)
        except (binascii.Error, ValueError):
            raise CodecError("parameters: bad base64 data") from None
    if isinstance(value, str):
        return value.encode("utf-8")
    raise CodecError(f"parameters: expected bytes, got {type(value).__name__}")

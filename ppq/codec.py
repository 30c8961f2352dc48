"""Payload encoding for task parameters and results.

The default codec is msgpack: JSON-like data (None, bool, int, float, str, list,
dict) plus bytes, compact and fast. Tuples come back as lists. JSON text is
accepted for parameters too, for outside clients that cannot send msgpack.

Pickle carries any Python object and therefore runs code on load; it is used only
where both ends opt in (``allow_pickle``). A pickled payload is recognised by its
header and refused everywhere else.
"""

from __future__ import annotations

import base64
import binascii
import json
import pickle
import threading
from typing import Any

import msgpack

from .errors import CodecError

_JSON_START = frozenset(b"[{ \t\r\n")


def is_pickle(data: bytes) -> bool:
    """True if ``data`` looks like a pickle (protocol 2 or later)."""
    return len(data) > 2 and data[0] == 0x80 and 2 <= data[1] <= 5 and data[-1:] == b"."


_packers = threading.local()


def pack(obj: Any) -> bytes:
    """msgpack ``obj`` with this thread's packer (making one per call costs more than packing small data)."""
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    try:
        return packer.pack(obj)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        packer.reset()
        raise CodecError(
            f"cannot encode a value of type {type(_offender(obj)).__name__}: the default codec "
            f"carries JSON-like data and bytes ({exc})"
        ) from None


def encode(obj: Any, use_pickle: bool = False) -> bytes:
    """Encode ``obj``; with ``use_pickle`` fall back to pickle for non JSON-like data."""
    try:
        return pack(obj)
    except CodecError:
        if use_pickle:
            return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        raise


def _offender(obj: Any) -> Any:
    """The first value inside ``obj`` that msgpack cannot carry (for error messages)."""
    if isinstance(obj, (list, tuple)):
        for item in obj:
            found = _offender(item)
            if found is not None:
                return found
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            for item in (k, v):
                found = _offender(item)
                if found is not None:
                    return found
        return None
    try:
        msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return obj
    return None


def decode(data: bytes, allow_pickle: bool = False) -> Any:
    """Decode what :func:`encode` made."""
    if is_pickle(data):
        if not allow_pickle:
            raise CodecError("payload is a pickle, and pickle is not enabled here "
                             "(worker.allow_pickle on a worker, client.allow_pickle on a client)")
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


def decode_parameters(data: bytes, allow_pickle: bool = False) -> tuple[list[Any], dict[str, Any]]:
    """Decode and check an ``(args, kwargs)`` pair."""
    if data[:1] and data[0] in _JSON_START:
        try:
            pair = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CodecError(f"parameters: not valid JSON: {exc}") from None
    else:
        try:
            pair = decode(data, allow_pickle=allow_pickle)
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

"""Messages to frames and back.

A message is a msgpack-able structure (usually a dict with an ``op``, or a list
of such dicts when batched).  Two kinds of values get special treatment:

* ``tuple``: msgpack would turn tuples into lists, but dask keys are tuples and
  must round-trip exactly, so tuples travel as a msgpack extension type.
* :class:`Serialized`: user data (functions, arguments, results, exceptions),
  already pickled.  Its pickle stream and its out-of-band buffers (pickle
  protocol 5, e.g. the memory of a numpy array) travel as frames of their own
  after the msgpack header, so a 100 MB array is never copied into one big
  bytes object.

This module never unpickles user data on its own: :func:`loads` gives back
``Serialized`` objects, and only :func:`deserialize`, called by workers and
executors, turns them into Python objects.  The scheduler never calls it.

Wire format of one message (all integers little-endian uint64)::

    n_frames | len(frame_0) ... len(frame_{n-1}) | frame_0 ... frame_{n-1}

``frame_0`` is the msgpack header; the rest are payload frames referenced from
it.
"""
from __future__ import annotations

import importlib
import pickle
import struct
import sys
import types

import cloudpickle
import msgpack

__all__ = ["Serialized", "ProtocolError", "serialize", "deserialize", "dumps", "loads"]

_EXT_TUPLE = 1
_EXT_SERIALIZED = 2

#: Pickle buffers smaller than this stay inside the pickle stream: a frame of
#: its own costs more than copying a few bytes.
OUT_OF_BAND_MIN = 2048
#: A pickle stream longer than this becomes its own frame instead of being
#: copied into the msgpack header.
INLINE_MAX = 64 * 1024

# Types that the standard pickler serializes by value, so cloudpickle's
# by-value machinery is not needed (it is slower for tiny objects).
_PLAIN_TYPES = frozenset([int, float, str, bytes, bool, type(None), complex])


class ProtocolError(Exception):
    """Bytes on a connection that do not form a valid message."""


class Serialized:
    """Pickled user data: a pickle stream plus its out-of-band buffers.

    Held opaquely by anything that only forwards data (the scheduler).
    """

    __slots__ = ("header", "frames")

    def __init__(self, header, frames=()):
        self.header = header
        self.frames = tuple(frames) if frames else ()

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(_nbytes(f) for f in self.frames)

    def __eq__(self, other):
        return (
            isinstance(other, Serialized)
            and bytes(self.header) == bytes(other.header)
            and [bytes(f) for f in self.frames] == [bytes(f) for f in other.frames]
        )

    def __repr__(self):
        return "<Serialized: %d bytes in %d frames>" % (self.nbytes, 1 + len(self.frames))


def _nbytes(frame) -> int:
    if isinstance(frame, memoryview):
        return frame.nbytes
    return len(frame)


def serialize(obj) -> Serialized:
    """Pickle ``obj`` with protocol 5, large buffers out of band.

    >>> s = serialize([1, 2, 3])
    >>> deserialize(s)
    [1, 2, 3]

    Raises ``TypeError("Could not serialize object of type ...")`` when the
    object cannot be pickled.
    """
    if type(obj) in _PLAIN_TYPES:
        return Serialized(pickle.dumps(obj, protocol=5))
    buffers = []

    def keep(buf):
        raw = buf.raw()
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True  # in band
        buffers.append(raw)
        return False

    # The standard pickler is about twice as fast as cloudpickle, and is
    # right whenever everything it refers to by name can be imported on the
    # other side: not so for anything defined in __main__ (or lambdas and
    # local functions, which it refuses outright).
    if not cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES:
        try:
            header = pickle.dumps(obj, protocol=5, buffer_callback=keep)
        except Exception:
            header = None
        if header is not None and b"__main__" not in header:
            return Serialized(header, buffers)
        buffers = []
    try:
        header = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep)
    except Exception as e:
        raise TypeError(
            "Could not serialize object of type %s: %s" % (type(obj).__name__, e)
        ) from e
    return Serialized(header, buffers)


def dumps_inband(obj) -> bytes:
    """Pickle a function into one bytes object with cloudpickle (no
    out-of-band buffers).

    A method of a module-level object that the module exports by name, such
    as ``random.random`` or ``numpy.random.random``, goes by reference:
    pickled normally it carries a copy of its object (the generator's state),
    so every worker would draw the same "random" numbers.
    """
    ref = _module_attribute(obj)
    if ref is not None:
        return pickle.dumps(_ByReference(*ref), protocol=5)
    try:
        return cloudpickle.dumps(obj, protocol=5)
    except Exception as e:
        raise TypeError("Could not serialize object of type %s: %s" % (type(obj).__name__, e)) from e


def _module_attribute(obj):
    """``(module, name)`` if ``obj`` is a bound method of some object that an
    importable module (not ``__main__``, not pickled by value) exports as
    ``module.name``; else None."""
    owner = getattr(obj, "__self__", None)
    name = getattr(obj, "__name__", None)
    if owner is None or isinstance(owner, types.ModuleType) or not isinstance(name, str):
        return None  # plain and builtin functions already go by reference
    for modname in (getattr(obj, "__module__", None), getattr(type(owner), "__module__", None)):
        if not modname or modname == "__main__" \
                or modname in cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES:
            continue
        module = sys.modules.get(modname)
        if module is not None and getattr(module, name, None) is obj:
            return modname, name
    return None


def _import_attribute(modname, name):
    return getattr(importlib.import_module(modname), name)


class _ByReference:
    """Unpickles as ``getattr(import_module(modname), name)``."""

    def __init__(self, modname, name):
        self.modname, self.name = modname, name

    def __reduce__(self):
        return _import_attribute, (self.modname, self.name)


def deserialize(s: Serialized):
    """Inverse of :func:`serialize`.  Errors raised by unpickling propagate."""
    return pickle.loads(s.header, buffers=s.frames)


# ---------------------------------------------------------------- msgpack layer
def dumps(msg) -> list:
    """Message to a list of frames; frame 0 is the msgpack header."""
    frames = [None]

    def default(obj):
        if type(obj) is tuple:
            for item in obj:
                if type(item) not in _FLAT:
                    # nested: a fresh packer, since a Packer is not re-entrant
                    return msgpack.ExtType(_EXT_TUPLE, msgpack.packb(
                        list(obj), default=default, use_bin_type=True, strict_types=True))
            # flat tuples (most keys) never re-enter ``default``
            return msgpack.ExtType(_EXT_TUPLE, _flat_packer.pack(list(obj)))
        if type(obj) is Serialized:
            start = len(frames)
            if len(obj.header) > INLINE_MAX:
                frames.append(obj.header)
                head = None
            else:
                head = obj.header
            frames.extend(obj.frames)
            return msgpack.ExtType(
                _EXT_SERIALIZED, _pack_plain([head, start, len(frames) - start])
            )
        if isinstance(obj, (set, frozenset)):
            return list(obj)
        if hasattr(obj, "item") and hasattr(obj, "dtype"):  # numpy scalar in a key
            return obj.item()
        raise TypeError("Cannot send object of type %s in a message header" % type(obj).__name__)

    try:
        frames[0] = msgpack.Packer(default=default, use_bin_type=True, strict_types=True).pack(msg)
    finally:
        # ``default`` refers to itself (nested tuples), a cycle that would
        # keep ``frames`` and the data in them alive until the next garbage
        # collection: a worker held each 500 MB array it sent for seconds
        default = None
    return frames


_FLAT = frozenset([str, int, float, bool, bytes, type(None)])
_flat_packer = msgpack.Packer(use_bin_type=True, strict_types=True)


def _pack_plain(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def loads(frames):
    """Frames to a message.  ``Serialized`` values come back still pickled."""

    def ext_hook(code, data):
        if code == _EXT_TUPLE:
            return tuple(msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False,
                                         use_list=True))
        if code == _EXT_SERIALIZED:
            head, start, count = msgpack.unpackb(data, raw=False)
            sub = frames[start : start + count]
            if len(sub) != count:
                raise ProtocolError("message refers to missing frames")
            if head is None:
                return Serialized(sub[0], sub[1:])
            return Serialized(head, sub)
        raise ProtocolError("unknown msgpack extension type %d" % code)

    try:
        return msgpack.unpackb(frames[0], ext_hook=ext_hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as e:
        raise ProtocolError("could not decode message header: %s: %s" % (type(e).__name__, e)) from e
    finally:
        ext_hook = None  # it refers to itself: see dumps


# ---------------------------------------------------------------- framing
def frame_prefix(frames) -> bytes:
    """The length prefix written before the frames of one message."""
    n = len(frames)
    return struct.pack("<%dQ" % (n + 1), n, *[_nbytes(f) for f in frames])

"""Unit tests for distributed.protocol: messages to frames and back (no loop)."""
import pickle
import struct
import threading

import msgpack
import numpy as np
import pytest

from distributed.protocol import (
    INLINE_MAX,
    OUT_OF_BAND_MIN,
    ProtocolError,
    Serialized,
    deserialize,
    dumps,
    frame_prefix,
    loads,
    serialize,
)


def roundtrip(msg):
    return loads(dumps(msg))


def wire_roundtrip(msg):
    """Message -> bytes as written on a socket -> message, parsing the prefix."""
    frames = dumps(msg)
    wire = frame_prefix(frames) + b"".join(bytes(f) for f in frames)
    (n,) = struct.unpack_from("<Q", wire, 0)
    lengths = struct.unpack_from("<%dQ" % n, wire, 8)
    pos = 8 + 8 * n
    parsed = []
    for length in lengths:
        parsed.append(wire[pos : pos + length])
        pos += length
    assert pos == len(wire)
    return loads(parsed)


def test_nested_dicts_and_lists_round_trip_exactly():
    msg = {
        "op": "update-graph",
        "tasks": {"x": {"a": [1, 2.5, None, True], "b": {"c": [b"raw", "text"]}}},
        "keys": ["x", "y"],
        "n": -3,
        "big": 2**63 - 1,
    }
    out = roundtrip(msg)
    assert out == msg
    assert type(out["tasks"]["x"]["b"]["c"][0]) is bytes
    assert type(out["tasks"]["x"]["b"]["c"][1]) is str


def test_tuple_keys_stay_tuples_including_nested_and_dict_keys():
    key = ("x-123", 0, 1)
    nested = ("outer", ("inner", 2), 3.5)
    msg = {
        "op": "compute-task",
        "key": key,
        "nested": nested,
        "who_has": {key: ["tcp://a:1"], nested: [], "plain": ["tcp://b:1"]},
        "keys": [key, "y", nested],
        "nbytes": {("y", 0): 8},
    }
    out = roundtrip(msg)
    assert out == msg
    assert type(out["key"]) is tuple
    assert type(out["nested"][1]) is tuple
    assert set(out["who_has"]) == {key, nested, "plain"}
    assert all(type(k) is tuple for k in out["who_has"] if k != "plain")
    assert type(out["keys"][2][1]) is tuple
    assert out["nbytes"] == {("y", 0): 8}


def test_tuples_survive_the_wire_framing():
    msg = {"op": "x", "key": ("a", (1, ("b",)))}
    assert wire_roundtrip(msg) == msg


def test_list_stays_list_and_tuple_stays_tuple():
    out = roundtrip({"l": [1, 2], "t": (1, 2)})
    assert out == {"l": [1, 2], "t": (1, 2)}
    assert type(out["l"]) is list and type(out["t"]) is tuple


def test_sets_become_lists_and_numpy_scalars_become_python_numbers():
    out = roundtrip({"keys": {"only"}, "key": ("x", np.int64(3))})
    assert out == {"keys": ["only"], "key": ("x", 3)}
    assert type(out["key"][1]) is int


def test_unknown_header_type_raises_type_error():
    with pytest.raises(TypeError, match="Cannot send object of type object"):
        dumps({"op": "x", "bad": object()})


def test_large_numpy_array_travels_out_of_band_without_copy():
    x = np.arange(1_000_000, dtype="f8")  # 8 MB
    msg = {"op": "task-finished", "data": serialize(x)}
    frames = dumps(msg)

    assert len(frames) > 1
    # the 8 MB are not inside the header frame
    assert len(frames[0]) < 1000
    # the array's own memory is a frame (no copy made)
    buffer_frames = [f for f in frames[1:] if memoryview(f).nbytes == x.nbytes]
    assert len(buffer_frames) == 1
    assert np.shares_memory(np.frombuffer(buffer_frames[0], dtype="f8"), x)

    out = loads(frames)
    assert isinstance(out["data"], Serialized)
    assert out["data"] == msg["data"]
    y = deserialize(out["data"])
    assert y.dtype == x.dtype and y.shape == x.shape
    assert (y == x).all()


def test_large_numpy_array_round_trips_through_the_wire_format():
    x = np.arange(300_000, dtype="i8").reshape(3, -1)
    out = wire_roundtrip({"op": "x", "data": serialize(x)})
    np.testing.assert_array_equal(deserialize(out["data"]), x)


def test_serialized_inside_a_tuple_keeps_its_frames():
    x = np.ones(10_000, dtype="u1")
    msg = {"args": (serialize(x), 1)}
    frames = dumps(msg)
    assert len(frames) == 2
    out = loads(frames)
    assert type(out["args"]) is tuple and out["args"][1] == 1
    np.testing.assert_array_equal(deserialize(out["args"][0]), x)


def test_two_serialized_values_get_their_own_frames_in_order():
    a = np.zeros(5000, dtype="u1")
    b = np.full(7000, 3, dtype="u1")
    frames = dumps({"a": serialize(a), "b": serialize(b)})
    assert sorted(memoryview(f).nbytes for f in frames[1:]) == [5000, 7000]
    out = loads(frames)
    np.testing.assert_array_equal(deserialize(out["a"]), a)
    np.testing.assert_array_equal(deserialize(out["b"]), b)


def test_small_objects_stay_in_band():
    small = np.arange(10, dtype="i8")  # 80 bytes < OUT_OF_BAND_MIN
    assert small.nbytes < OUT_OF_BAND_MIN
    for obj in [[1, 2, 3], {"a": 1}, "text", b"bytes", 12, small]:
        s = serialize(obj)
        assert list(s.frames) == []
        frames = dumps({"op": "x", "value": s})
        assert len(frames) == 1
        out = deserialize(loads(frames)["value"])
        if isinstance(obj, np.ndarray):
            np.testing.assert_array_equal(out, obj)
        else:
            assert out == obj


def test_long_pickle_stream_becomes_its_own_frame():
    data = b"x" * (INLINE_MAX + 10)
    s = serialize(data)
    assert list(s.frames) == []  # plain bytes pickle in band...
    frames = dumps({"op": "x", "value": s})
    assert len(frames) == 2  # ...but the long stream is not copied into the header
    assert len(frames[0]) < 100
    assert deserialize(loads(frames)["value"]) == data


def test_serialize_functions_and_lambdas_by_value():
    f = lambda x: x + 41  # noqa: E731
    assert deserialize(serialize(f))(1) == 42


def test_serialized_nbytes_and_equality():
    s = Serialized(b"abc", [b"de", memoryview(b"fgh")])
    assert s.nbytes == 8
    assert s == Serialized(b"abc", [b"de", b"fgh"])
    assert s != Serialized(b"abc", [b"de"])
    assert s != b"abc"


def test_serialize_unpicklable_object_raises_type_error():
    with pytest.raises(TypeError, match="Could not serialize object of type lock"):
        serialize(threading.Lock())


def test_serialize_unpicklable_object_nested_in_a_list_raises_type_error():
    with pytest.raises(TypeError, match="Could not serialize object of type list"):
        serialize([1, threading.Lock()])


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xc1",  # a byte msgpack never uses
        b"\x92\x01",  # array of 2 with only one element
        b"\x81\xa1k",  # map with a key but no value
        b"",
        b"\x01\x02",  # extra data after a complete object
    ],
)
def test_loads_of_garbage_raises_protocol_error(garbage):
    with pytest.raises(ProtocolError):
        loads([garbage])


def test_loads_of_unknown_extension_type_raises_protocol_error():
    header = msgpack.packb(msgpack.ExtType(42, b"zz"))
    with pytest.raises(ProtocolError, match="unknown msgpack extension type 42"):
        loads([header])


def test_loads_of_message_missing_its_payload_frames_raises_protocol_error():
    frames = dumps({"op": "x", "data": serialize(np.zeros(10_000))})
    assert len(frames) == 2
    with pytest.raises(ProtocolError, match="missing frames"):
        loads(frames[:1])


def test_deserialize_errors_propagate():
    with pytest.raises(pickle.UnpicklingError):
        deserialize(Serialized(b"not a pickle"))


def test_frame_prefix_layout():
    frames = [b"abc", b"", b"de"]
    assert frame_prefix(frames) == struct.pack("<4Q", 3, 3, 0, 2)
    assert len(frame_prefix(frames)) == 8 * 4


def test_frame_prefix_counts_bytes_of_memoryviews_not_items():
    mv = memoryview(np.arange(10, dtype="i8"))
    assert len(mv) == 10
    assert frame_prefix([b"h", mv]) == struct.pack("<3Q", 2, 1, 80)


def test_frame_prefix_of_a_real_message():
    x = np.arange(1000, dtype="f8")
    frames = dumps({"op": "x", "data": serialize(x)})
    prefix = frame_prefix(frames)
    values = struct.unpack("<%dQ" % (len(frames) + 1), prefix)
    assert values[0] == len(frames)
    assert list(values[1:]) == [memoryview(f).nbytes for f in frames]
    assert values[-1] == 8000


def test_dumps_and_loads_hold_no_data_once_their_result_is_dropped():
    # a reference cycle inside dumps/loads kept every sent and received
    # buffer alive until the next garbage collection (500 MB per transfer)
    import gc
    import weakref

    import numpy as np

    gc.disable()
    try:
        arr = np.arange(1_000_000, dtype="f8")
        sent = weakref.ref(arr)
        frames = dumps({"op": "x", "data": serialize(arr), "key": ("a", (1, 2))})
        wire = np.frombuffer(b"".join(bytes(f) for f in frames), dtype="u1")
        del arr, frames
        assert sent() is None
        received = weakref.ref(wire)
        lengths = [len(f) for f in dumps({"op": "x", "data": serialize(np.arange(1_000_000.0)),
                                          "key": ("a", (1, 2))})]
        view, pos, parts = memoryview(wire), 0, []
        for n in lengths:
            parts.append(view[pos:pos + n])
            pos += n
        msg = loads(parts)
        assert deserialize(msg["data"])[-1] == 999_999.0 and msg["key"] == ("a", (1, 2))
        del msg, parts, view, wire
        assert received() is None
    finally:
        gc.enable()


def test_module_level_bound_methods_are_pickled_by_name_not_with_their_state():
    import random

    from distributed.protocol import dumps_inband

    # a copy of random's hidden Random instance would make every worker
    # draw the same numbers
    f1 = pickle.loads(dumps_inband(random.random))
    f2 = pickle.loads(dumps_inband(random.random))
    assert f1 is random.random and f2 is random.random
    assert len(dumps_inband(random.random)) < 200
    assert pickle.loads(dumps_inband(np.random.random)) is np.random.random
    # other callables are unaffected
    assert pickle.loads(dumps_inband(len)) is len
    bound = random.Random(5).random
    assert pickle.loads(dumps_inband(bound))() == random.Random(5).random()

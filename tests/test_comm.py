"""Comm and server layer: addresses, TCP comms, Server/rpc, ConnectionPool,
BatchedSend and RateLimitedLog, all on one asyncio loop over loopback TCP."""
import asyncio
import socket
import struct
import time

import msgpack
import numpy as np
import pytest

from distributed.batched import BatchedSend
from distributed.comm import CommClosedError, connect, listen, normalize_address, parse_address
from distributed.core import ConnectionPool, RateLimitedLog, RemoteError, Server, rpc
from distributed.protocol import Serialized, deserialize, frame_prefix, serialize


def run(coro_func, timeout=20):
    """Run ``coro_func()`` in a fresh loop, failing after ``timeout`` s."""

    async def main():
        return await asyncio.wait_for(coro_func(), timeout)

    return asyncio.run(main())


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in %s s" % timeout
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------- addresses
@pytest.mark.parametrize(
    "addr, expected",
    [
        ("tcp://127.0.0.1:8786", ("127.0.0.1", 8786)),
        ("127.0.0.1:8786", ("127.0.0.1", 8786)),
        ("alice:80", ("alice", 80)),
        ("tcp://[::1]:9000", ("::1", 9000)),
        ("[::1]:9000", ("::1", 9000)),
        ("tcp://:0", ("127.0.0.1", 0)),
        ("tcp://host:65535", ("host", 65535)),
    ],
)
def test_parse_address(addr, expected):
    assert parse_address(addr) == expected


def test_parse_address_default_port_only_when_missing():
    assert parse_address("tcp://alice", default_port=5) == ("alice", 5)
    assert parse_address("tcp://alice:6", default_port=5) == ("alice", 6)


@pytest.mark.parametrize(
    "addr, match",
    [
        ("udp://127.0.0.1:8786", "Unsupported address scheme 'udp'"),
        ("inproc://127.0.0.1:1", "Unsupported address scheme 'inproc'"),
        ("tcp://127.0.0.1:http", "non-numeric port"),
        ("tcp://127.0.0.1:65536", "out of range"),
        ("tcp://127.0.0.1:-1", "out of range"),
        ("tcp://127.0.0.1", "has no port"),
        ("alice", "has no port"),
    ],
)
def test_parse_address_rejects_bad_scheme_and_port(addr, match):
    with pytest.raises(ValueError, match=match):
        parse_address(addr)


def test_parse_address_rejects_non_strings():
    with pytest.raises(TypeError):
        parse_address(("127.0.0.1", 8786))


def test_normalize_address_bare_host_port_means_tcp():
    assert normalize_address("127.0.0.1:8786") == "tcp://127.0.0.1:8786"
    assert normalize_address("tcp://alice:1") == "tcp://alice:1"
    assert normalize_address("[::1]:80") == "tcp://[::1]:80"
    with pytest.raises(ValueError):
        normalize_address("ws://alice:1")


# ---------------------------------------------------------------- comms
async def echo_listener(received=None):
    async def handle(comm):
        while True:
            try:
                msg = await comm.read()
            except CommClosedError:
                return
            if received is not None:
                received.append(msg)
            await comm.write(msg)

    return await listen("tcp://127.0.0.1:0", handle)


def test_connect_listen_write_read_round_trip():
    async def main():
        received = []
        listener = await echo_listener(received)
        try:
            assert listener.address.startswith("tcp://127.0.0.1:")
            assert parse_address(listener.address)[1] > 0
            comm = await connect(listener.address, timeout=5)
            assert comm.peer_address == listener.address
            assert comm.local_address.startswith("tcp://127.0.0.1:")
            msg = {"op": "ping", "key": ("x", 1), "values": [1, "a", b"b"]}
            for _ in range(3):
                n = await comm.write(msg)
                assert n > 0
                assert await comm.read() == msg
            assert received == [msg] * 3
            assert not comm.closed()
            await comm.close()
            assert comm.closed()
        finally:
            listener.stop()

    run(main)


def test_large_numpy_payload_round_trip():
    x = np.random.RandomState(0).random_sample(2_500_000)  # 20 MB
    assert x.nbytes == 20_000_000

    async def main():
        received = []
        listener = await echo_listener(received)
        try:
            comm = await connect(listener.address, timeout=5)
            n = await comm.write({"op": "data", "key": ("x", 0), "data": serialize(x)})
            assert n > x.nbytes
            back = await comm.read()
            # on the server the array arrived as one frame of its own
            (server_side,) = received
            assert isinstance(server_side["data"], Serialized)
            assert [memoryview(f).nbytes for f in server_side["data"].frames] == [x.nbytes]
            assert back["key"] == ("x", 0)
            y = deserialize(back["data"])
            assert y.dtype == x.dtype and y.shape == x.shape
            assert (y == x).all()
            await comm.close()
        finally:
            listener.stop()

    run(main, timeout=60)


def test_read_raises_comm_closed_error_when_peer_closes():
    async def main():
        async def handle(comm):
            await comm.close()

        listener = await listen("tcp://127.0.0.1:0", handle)
        try:
            comm = await connect(listener.address, timeout=5)
            with pytest.raises(CommClosedError):
                await comm.read()
            assert comm.closed()
            with pytest.raises(CommClosedError):
                await comm.write({"op": "x"})
            with pytest.raises(CommClosedError):
                await comm.read()
        finally:
            listener.stop()

    run(main)


def test_peer_read_raises_comm_closed_error_after_local_abort():
    async def main():
        outcome = asyncio.get_running_loop().create_future()

        async def handle(comm):
            try:
                await comm.read()
                outcome.set_result("message")
            except CommClosedError:
                outcome.set_result("closed")

        listener = await listen("tcp://127.0.0.1:0", handle)
        try:
            comm = await connect(listener.address, timeout=5)
            comm.abort()
            assert await outcome == "closed"
        finally:
            listener.stop()

    run(main)


def test_connect_to_closed_port_raises_os_error_within_timeout():
    addr = "tcp://127.0.0.1:%d" % closed_port()

    async def main():
        start = time.monotonic()
        with pytest.raises(OSError, match="Timed out after 0.5 s trying to connect to " + addr):
            await connect(addr, timeout=0.5)
        elapsed = time.monotonic() - start
        assert 0.3 < elapsed < 2.0

    run(main)


# ---------------------------------------------------------------- Server and rpc
class Calculator(Server):
    def __init__(self):
        super().__init__(
            {
                "add-numbers": self.handle_add_numbers,
                "fail": self.handle_fail,
                "echo-sync": lambda comm, x: x,
                "slow": self.handle_slow,
            },
            name="calculator",
        )
        self.calls = 0

    async def handle_add_numbers(self, comm, x, y):
        self.calls += 1
        return x + y

    async def handle_fail(self, comm):
        raise ValueError("boom")

    async def handle_slow(self, comm, delay):
        await asyncio.sleep(delay)
        return "done"


async def start_calculator():
    server = Calculator()
    await server.listen("tcp://127.0.0.1:0")
    return server


def stop(server):
    server.stop_listening()
    server.close_comms()


def test_rpc_op_is_kebab_case_of_method_name():
    async def main():
        server = await start_calculator()
        pool = ConnectionPool()
        try:
            r = rpc(server.address, pool)
            assert await r.add_numbers(x=1, y=2) == 3
            assert await r.echo_sync(x=("k", 1)) == ("k", 1)
            assert await r.identity() == {"type": "Calculator", "address": server.address}
            assert server.calls == 1
            assert server.bad_messages == 0
        finally:
            pool.close()
            stop(server)

    run(main)


def test_rpc_raises_remote_error_for_handler_exception():
    async def main():
        server = await start_calculator()
        pool = ConnectionPool()
        try:
            with pytest.raises(RemoteError, match="ValueError: boom"):
                await pool.rpc(server.address).fail()
            # a failing handler is not bad input, and the server still answers
            assert server.bad_messages == 0
            assert await pool.rpc(server.address).add_numbers(x=2, y=3) == 5
        finally:
            pool.close()
            stop(server)

    run(main)


def test_rpc_with_missing_arguments_raises_remote_error_and_counts_bad_message():
    async def main():
        server = await start_calculator()
        pool = ConnectionPool()
        try:
            with pytest.raises(RemoteError, match="TypeError"):
                await pool.rpc(server.address).add_numbers(x=1)
            assert server.bad_messages == 1
            assert await pool.rpc(server.address).add_numbers(x=1, y=1) == 2
        finally:
            pool.close()
            stop(server)

    run(main)


def test_unknown_op_gets_error_reply_then_connection_dropped():
    async def main():
        server = await start_calculator()
        try:
            comm = await connect(server.address, timeout=5)
            await comm.write({"op": "no-such-op"})
            reply = await comm.read()
            assert reply == {
                "status": "error",
                "type": "ValueError",
                "text": "ValueError: unknown op 'no-such-op'",
            }
            with pytest.raises(CommClosedError):
                await comm.read()
            assert server.bad_messages == 1
        finally:
            stop(server)

    run(main)


async def send_raw_and_wait_for_close(address, payload):
    """Write raw bytes to ``address``; return what the server sent back
    before closing the connection (it must close it)."""
    host, port = parse_address(address)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(payload)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)  # until EOF
    writer.close()
    return data


def raw_message(header: bytes) -> bytes:
    return frame_prefix([header]) + header


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"this is not a message at all", id="garbage"),
        pytest.param(raw_message(b"\xc1\xc1\xc1"), id="undecodable-header"),
        pytest.param(struct.pack("<2Q", 1, 2**62) + b"x" * 100, id="oversized-length"),
        pytest.param(struct.pack("<Q", 2**40), id="too-many-frames"),
        pytest.param(raw_message(msgpack.packb([1, 2, 3])), id="msgpack-not-a-dict"),
        pytest.param(raw_message(msgpack.packb({"no": "op"})), id="dict-without-op"),
        pytest.param(raw_message(msgpack.packb({"op": 12})), id="op-not-a-string"),
    ],
)
def test_bad_input_drops_only_that_connection(payload):
    async def main():
        server = await start_calculator()
        try:
            good = await connect(server.address, timeout=5)
            await good.write({"op": "add-numbers", "x": 1, "y": 1})
            assert await good.read() == 2

            reply = await send_raw_and_wait_for_close(server.address, payload)
            assert reply == b""  # no answer, just closed
            assert server.bad_messages == 1

            # the established connection and new ones are still served
            await good.write({"op": "add-numbers", "x": 2, "y": 2})
            assert await good.read() == 4
            other = await connect(server.address, timeout=5)
            await other.write({"op": "add-numbers", "x": 3, "y": 3})
            assert await other.read() == 6
            assert server.bad_messages == 1
            await until(lambda: len(server.comms) == 2)
            good.abort()
            other.abort()
        finally:
            stop(server)

    run(main)


def test_many_bad_connections_are_counted_and_server_keeps_serving():
    payloads = [
        b"garbage garbage garbage!",
        struct.pack("<2Q", 1, 2**62),
        raw_message(msgpack.packb("a string")),
        raw_message(msgpack.packb({"op": "no-such-op", "reply": False})),
    ]

    async def main():
        server = await start_calculator()
        pool = ConnectionPool()
        try:
            for i in range(3):
                for payload in payloads:
                    assert await send_raw_and_wait_for_close(server.address, payload) == b""
                assert await pool.rpc(server.address).add_numbers(x=i, y=1) == i + 1
            assert server.bad_messages == 12
            assert server.bad_input.total == 12
        finally:
            pool.close()
            stop(server)

    run(main)


# ---------------------------------------------------------------- ConnectionPool
def test_connection_pool_reuses_connections():
    async def main():
        server = await start_calculator()
        pool = ConnectionPool()
        try:
            r = pool.rpc(server.address)
            assert await r.add_numbers(x=1, y=2) == 3
            (comm,) = pool.available[server.address]
            assert await r.add_numbers(x=3, y=4) == 7
            assert pool.available[server.address] == [comm]
            assert pool.open == 1
            assert len(server.comms) == 1
        finally:
            pool.close()
            stop(server)

    run(main)


def test_connection_pool_opens_one_connection_per_concurrent_call_and_keeps_them():
    async def main():
        server = await start_calculator()
        pool = ConnectionPool()
        try:
            r = pool.rpc(server.address)
            assert await asyncio.gather(*[r.slow(delay=0.05) for _ in range(3)]) == ["done"] * 3
            assert pool.open == 3
            assert len(pool.available[server.address]) == 3
            assert await asyncio.gather(*[r.slow(delay=0.01) for _ in range(3)]) == ["done"] * 3
            assert pool.open == 3
        finally:
            pool.close()
            stop(server)

    run(main)


def test_connection_pool_drops_connection_after_error_reply():
    async def main():
        server = await start_calculator()
        pool = ConnectionPool()
        try:
            with pytest.raises(RemoteError):
                await pool.rpc(server.address).add_numbers(x=1)  # missing y
            assert pool.open == 0
            assert pool.available[server.address] == []
        finally:
            pool.close()
            stop(server)

    run(main)


def test_connection_pool_close_closes_idle_connections():
    async def main():
        server = await start_calculator()
        pool = ConnectionPool()
        try:
            await pool.rpc(server.address).add_numbers(x=1, y=2)
            (comm,) = pool.available[server.address]
            pool.close()
            assert comm.closed()
            assert pool.open == 0
            await until(lambda: not server.comms)
            with pytest.raises(CommClosedError):
                await pool.rpc(server.address).add_numbers(x=1, y=2)
        finally:
            stop(server)

    run(main)


def test_connection_pool_at_its_limit_waits_for_a_connection_to_come_back():
    async def main():
        server = await start_calculator()
        pool = ConnectionPool(limit=1)
        try:
            r = pool.rpc(server.address)
            results = await asyncio.wait_for(
                asyncio.gather(r.slow(delay=0.05), r.slow(delay=0.05)), 5)
            assert results == ["done", "done"]
            assert pool.open == 1
        finally:
            pool.close()
            stop(server)

    run(main)


def test_connection_pool_at_its_limit_can_reach_a_second_address():
    async def main():
        a = await start_calculator()
        b = await start_calculator()
        pool = ConnectionPool(limit=1)
        try:
            assert await pool.rpc(a.address).add_numbers(x=1, y=1) == 2
            result = await asyncio.wait_for(pool.rpc(b.address).add_numbers(x=2, y=2), 5)
            assert result == 4
            assert pool.open <= 1
        finally:
            pool.close()
            stop(a)
            stop(b)

    run(main)


# ---------------------------------------------------------------- BatchedSend
async def collecting_listener():
    """A listener that records every message it reads; returns
    ``(listener, reads)`` where reads is a list of what each read() gave."""
    reads = []

    async def handle(comm):
        while True:
            try:
                reads.append(await comm.read())
            except CommClosedError:
                return

    listener = await listen("tcp://127.0.0.1:0", handle)
    return listener, reads


def test_batched_send_sends_many_messages_of_one_iteration_in_one_write():
    async def main():
        listener, reads = await collecting_listener()
        try:
            comm = await connect(listener.address, timeout=5)
            bs = BatchedSend(interval=0.01, name="test")
            bs.start(comm)
            for i in range(100):
                bs.send({"op": "task-finished", "key": ("x", i)})
            await until(lambda: reads)
            await asyncio.sleep(0.05)
            assert reads == [[{"op": "task-finished", "key": ("x", i)} for i in range(100)]]
            assert bs.batches == 1
            assert bs.messages == 100
            await bs.close()
        finally:
            listener.stop()

    run(main)


def test_batched_send_keeps_order_across_batches():
    async def main():
        listener, reads = await collecting_listener()
        try:
            comm = await connect(listener.address, timeout=5)
            bs = BatchedSend(interval=0.005)
            bs.start(comm)
            sent = 0
            for burst in range(10):
                bs.send(*[{"i": sent + j} for j in range(burst + 1)])
                sent += burst + 1
                await asyncio.sleep(0.002 * (burst % 3))
            await bs.close()
            await until(lambda: sum(len(r) for r in reads) == sent)
            assert [m["i"] for batch in reads for m in batch] == list(range(sent))
            assert all(isinstance(r, list) for r in reads)
            assert bs.messages == sent
            assert bs.batches == len(reads)
            assert 1 < bs.batches <= 10
        finally:
            listener.stop()

    run(main)


def test_batched_send_flushes_buffer_on_close():
    async def main():
        listener, reads = await collecting_listener()
        try:
            comm = await connect(listener.address, timeout=5)
            bs = BatchedSend(interval=10.0)  # only close() can make it write again
            bs.start(comm)
            bs.send({"n": 0})
            await until(lambda: len(reads) == 1)
            bs.send({"n": 1})
            bs.send({"n": 2})
            await bs.close(timeout=1.0)  # must not wait for the 10 s interval
            assert comm.closed()
            await until(lambda: len(reads) == 2)
            assert reads == [[{"n": 0}], [{"n": 1}, {"n": 2}]]
            assert (bs.batches, bs.messages) == (2, 3)
        finally:
            listener.stop()

    run(main)


def test_batched_send_buffers_messages_sent_before_start():
    async def main():
        listener, reads = await collecting_listener()
        try:
            bs = BatchedSend(interval=0.01)
            bs.send({"n": 0}, {"n": 1})
            comm = await connect(listener.address, timeout=5)
            bs.start(comm)
            await until(lambda: reads)
            assert reads == [[{"n": 0}, {"n": 1}]]
            await bs.close()
        finally:
            listener.stop()

    run(main)


def test_batched_send_refuses_sends_after_close():
    async def main():
        listener, reads = await collecting_listener()
        try:
            comm = await connect(listener.address, timeout=5)
            bs = BatchedSend()
            bs.start(comm)
            await bs.close()
            with pytest.raises(CommClosedError):
                bs.send({"late": True})
            assert reads == []
        finally:
            listener.stop()

    run(main)


def test_batched_send_close_returns_promptly_when_peer_is_gone():
    async def main():
        async def handle(comm):
            await comm.close()

        listener = await listen("tcp://127.0.0.1:0", handle)
        try:
            comm = await connect(listener.address, timeout=5)
            bs = BatchedSend(interval=0.001)
            bs.start(comm)
            with pytest.raises(CommClosedError):
                await comm.read()  # the peer closed
            bs.send({"n": 1})
            start = time.monotonic()
            await bs.close(timeout=2.0)
            assert time.monotonic() - start < 1.0
            assert bs.task.done()
        finally:
            listener.stop()

    run(main)


# ---------------------------------------------------------------- RateLimitedLog
class ListLogger:
    def __init__(self):
        self.records = []

    def warning(self, msg, *args):
        self.records.append(msg % args)


def test_rate_limited_log_allows_first_few_per_window_and_counts_the_rest():
    logger = ListLogger()
    log = RateLimitedLog(logger, per_window=2, window=10.0)
    assert [log.allow(now=t) for t in [0.0, 1.0, 2.0, 10.0]] == [True, True, False, False]
    assert (log.suppressed, log.total) == (2, 4)
    assert logger.records == []
    # a new window: the suppressed count is reported once and reset
    assert log.allow(now=10.5) is True
    assert logger.records == ["... 2 similar events not logged in the last 10 s"]
    assert (log.suppressed, log.count, log.total) == (0, 1, 5)
    assert log.allow(now=11.0) is True
    assert log.allow(now=12.0) is False
    assert len(logger.records) == 1


def test_rate_limited_log_warning_logs_only_allowed_messages():
    logger = ListLogger()
    log = RateLimitedLog(logger, per_window=3, window=3600.0)
    for i in range(10):
        log.warning("bad input %d from %s", i, "tcp://x:1")
    assert logger.records == ["bad input %d from tcp://x:1" % i for i in range(3)]
    assert log.suppressed == 7

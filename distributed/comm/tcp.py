"""TCP transport on Tornado's IOStream.

Reads allocate one buffer per message and read straight into it
(``read_into``), so a large frame is received without extra copies; frames are
memoryviews of that buffer.  Writes hand each frame to the stream separately,
so large buffers are never concatenated.
"""
from __future__ import annotations

import logging
import socket
import struct

from tornado.iostream import StreamClosedError
from tornado.tcpclient import TCPClient
from tornado.tcpserver import TCPServer

from .. import protocol
from ..protocol import ProtocolError
from .core import Comm, CommClosedError, Listener

logger = logging.getLogger(__name__)

#: At most this many frames, and this many bytes, in one message.  Larger
#: length prefixes are garbage or an attack; the connection is closed.
MAX_FRAMES = 1 << 20
MAX_MESSAGE_BYTES = 16 << 30
#: Small writes are joined into one ``write`` call.
JOIN_BELOW = 64 * 1024


def _address(host, port):
    if ":" in host:
        host = "[%s]" % host
    return "tcp://%s:%d" % (host, port)


class TCP(Comm):
    """A ``Comm`` over a Tornado ``IOStream``."""

    max_message_bytes = MAX_MESSAGE_BYTES

    def __init__(self, stream, local_address, peer_address):
        self.stream = stream
        self.local_address = local_address
        self.peer_address = peer_address
        stream.set_nodelay(True)
        # big frames should not be split into many small reads
        stream.max_buffer_size = MAX_MESSAGE_BYTES + 1

    def __repr__(self):
        return "<TCP %s -> %s%s>" % (self.local_address, self.peer_address,
                                     " closed" if self.closed() else "")

    async def read(self):
        stream = self.stream
        if stream is None:
            raise CommClosedError("connection to %s is closed" % self.peer_address)
        try:
            (n,) = struct.unpack("<Q", await stream.read_bytes(8))
            if not 0 < n <= MAX_FRAMES:
                raise ProtocolError("bad frame count %d from %s" % (n, self.peer_address))
            lengths = struct.unpack("<%dQ" % n, await stream.read_bytes(8 * n))
            total = sum(lengths)
            if total > self.max_message_bytes:
                raise ProtocolError("message of %d bytes from %s exceeds the limit of %d"
                                    % (total, self.peer_address, self.max_message_bytes))
            buf = bytearray(total)
            view = memoryview(buf)
            if total:
                await stream.read_into(view)
        except StreamClosedError as e:
            self.abort()
            raise CommClosedError("connection to %s closed: %s" % (self.peer_address, e.real_error or "EOF")) from None
        except ProtocolError:
            self.abort()
            raise
        frames = []
        pos = 0
        for length in lengths:
            frames.append(view[pos : pos + length])
            pos += length
        try:
            return protocol.loads(frames)
        except ProtocolError:
            self.abort()
            raise

    async def write(self, msg) -> int:
        stream = self.stream
        if stream is None:
            raise CommClosedError("connection to %s is closed" % self.peer_address)
        frames = protocol.dumps(msg)
        prefix = protocol.frame_prefix(frames)
        total = 0
        try:
            pending = [prefix]
            small = len(prefix)
            fut = None
            for frame in frames:
                size = protocol._nbytes(frame)
                total += size
                if size < JOIN_BELOW:
                    pending.append(frame)
                    small += size
                    if small < JOIN_BELOW:
                        continue
                    fut = stream.write(b"".join(pending))
                    pending, small = [], 0
                else:
                    if pending:
                        stream.write(b"".join(pending))
                        pending, small = [], 0
                    fut = stream.write(frame)
            if pending:
                fut = stream.write(b"".join(pending))
            if fut is not None:
                await fut
        except StreamClosedError as e:
            self.abort()
            raise CommClosedError("connection to %s closed: %s" % (self.peer_address, e.real_error or "EOF")) from None
        return total

    async def close(self):
        self.abort()

    def abort(self):
        stream, self.stream = self.stream, None
        if stream is not None and not stream.closed():
            stream.close()

    def closed(self) -> bool:
        return self.stream is None or self.stream.closed()


_client = None


async def tcp_connect(host, port) -> TCP:
    global _client
    if _client is None:
        _client = TCPClient()
    stream = await _client.connect(host, port, max_buffer_size=MAX_MESSAGE_BYTES + 1)
    local = stream.socket.getsockname()
    return TCP(stream, _address(local[0], local[1]), _address(host, port))


class _Server(TCPServer):
    def __init__(self, handle_comm):
        super().__init__(max_buffer_size=MAX_MESSAGE_BYTES + 1)
        self.handle_comm = handle_comm
        self.listen_address = ""

    async def handle_stream(self, stream, address):
        try:
            peer = _address(address[0], address[1])
        except (TypeError, IndexError):
            peer = "unknown"
        comm = TCP(stream, self.listen_address, peer)
        await self.handle_comm(comm)


class TCPListener(Listener):
    def __init__(self, host, port, handle_comm):
        self.host = host
        self.port = port
        self.handle_comm = handle_comm
        self.server = None

    async def start(self):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.server = _Server(self.handle_comm)
        sockets = __import__("tornado.netutil").netutil.bind_sockets(
            self.port, address=self.host, family=family, backlog=1024)
        self.port = sockets[0].getsockname()[1]
        self.server.add_sockets(sockets)
        self.address = _address(self.host, self.port)
        self.server.listen_address = self.address

    def stop(self):
        if self.server is not None:
            self.server.stop()
            self.server = None

"""A WebSocket over HTTP/3 (RFC 9220) client: aioquic for QUIC and HTTP/3, wsproto for the
WebSocket frames. Opens an extended CONNECT (`:protocol websocket`) to Spooky (verified with
the demo CA), sends COUNT binary messages of SIZE bytes (a byte pattern) and checks each
echo, sends a text message, then closes (`client`) or asks the server to (`server`, with the
text `close-from-server`). Prints one JSON line: what it saw.

Run: python3 ws_h3_client.py PORT CA_FILE PATH COUNT SIZE CLOSER
"""

from __future__ import annotations

import asyncio
import json
import sys

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.h3.connection import FrameUnexpected
from aioquic.quic.configuration import QuicConfiguration
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage, CloseConnection, Message, TextMessage


class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.events: asyncio.Queue = asyncio.Queue()

    def quic_event_received(self, event) -> None:
        for ev in self.h3.handle_event(event):
            self.events.put_nowait(ev)


async def main() -> int:
    port, ca, path, count, size, closer = sys.argv[1:7]
    count, size = int(count), int(size)
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="localhost")
    config.load_verify_locations(ca)
    config.max_data = 64 << 20
    config.max_stream_data = 16 << 20
    result: dict = {"echoed": 0}
    async with connect("127.0.0.1", int(port), configuration=config, create_protocol=Client) as c:
        sid = c._quic.get_next_available_stream_id()
        c.h3.send_headers(
            sid,
            [
                (b":method", b"CONNECT"),
                (b":protocol", b"websocket"),
                (b":scheme", b"https"),
                (b":authority", b"localhost"),
                (b":path", path.encode()),
                (b"sec-websocket-version", b"13"),
                (b"sec-websocket-protocol", b"echo"),
            ],
        )
        c.transmit()
        ws = Connection(ConnectionType.CLIENT)
        messages: asyncio.Queue = asyncio.Queue()
        closed = asyncio.Event()
        pending = bytearray()

        async def read() -> None:
            nonlocal pending
            while True:
                ev = await c.events.get()
                if isinstance(ev, HeadersReceived):
                    headers = dict(ev.headers)
                    result["status"] = int(headers.get(b":status", b"0"))
                    result["subprotocol"] = headers.get(b"sec-websocket-protocol", b"").decode()
                    messages.put_nowait(("head", None))
                elif isinstance(ev, DataReceived):
                    ws.receive_data(ev.data)
                    for wev in ws.events():
                        if isinstance(wev, (BytesMessage, TextMessage)):
                            pending += wev.data.encode() if isinstance(wev, TextMessage) else wev.data
                            if wev.message_finished:
                                text = isinstance(wev, TextMessage)
                                messages.put_nowait(("msg", pending.decode() if text else bytes(pending)))
                                pending = bytearray()
                        elif isinstance(wev, CloseConnection):
                            result["close_code"] = wev.code
                            if closer == "server":
                                # Answer the server's close, then end the stream.
                                c.h3.send_data(sid, ws.send(wev.response()), end_stream=True)
                                c.transmit()
                            closed.set()
                    if ev.stream_ended:
                        result["stream_ended"] = True
                        closed.set()
                        return

        reader = asyncio.create_task(read())
        kind, _ = await asyncio.wait_for(messages.get(), 10)
        if result.get("status") != 200:
            print(json.dumps(result), flush=True)
            return 0
        payload = bytes(i % 251 for i in range(size))

        async def sender() -> None:
            for _ in range(count):
                c.h3.send_data(sid, ws.send(Message(data=payload)), end_stream=False)
                c.transmit()
                await asyncio.sleep(0)

        sending = asyncio.create_task(sender())
        for _ in range(count):
            kind, got = await asyncio.wait_for(messages.get(), 30)
            if got != payload:
                result["mismatch"] = True
                break
            result["echoed"] += 1
        await sending
        c.h3.send_data(sid, ws.send(Message(data="hello text")), end_stream=False)
        c.transmit()
        kind, got = await asyncio.wait_for(messages.get(), 10)
        result["text"] = got
        if closer == "server":
            c.h3.send_data(sid, ws.send(Message(data="close-from-server")), end_stream=False)
        else:
            c.h3.send_data(sid, ws.send(CloseConnection(code=1000, reason="client says bye")), end_stream=False)
        c.transmit()
        await asyncio.wait_for(closed.wait(), 10)
        if closer == "client":
            try:
                c.h3.send_data(sid, b"", end_stream=True)
                c.transmit()
            except FrameUnexpected:
                # The server ended the stream and stopped reading it (RFC 9114 §4.1 allows
                # it once the tunnel is over): nothing left to end.
                pass
        reader.cancel()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

#!/usr/bin/env python3
"""A hostile HTTP/3 client on aioquic's public API: it asks for large responses and never
gives the server flow-control credit beyond its first windows (aioquic's MAX_DATA and
MAX_STREAM_DATA frames are suppressed), as a client that never reads would.

`--connections` connections, each with `--streams` GETs of `--path` at once, then it waits
`--wait` seconds and prints one JSON object:

    {"streams": N, "reset": N, "reset_codes": [...distinct codes], "ended": N,
     "bytes": N, "first_reset_s": x or null, "last_reset_s": x or null, "error": text or null}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from typing import Any

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import QuicEvent, StreamReset

# Never raise the limits the server may send up to.
QuicConnection._write_connection_limits = lambda self, *args, **kwargs: None  # type: ignore
QuicConnection._write_stream_limits = lambda self, *args, **kwargs: None  # type: ignore


class Stalling(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.reset: dict[int, tuple[int, float]] = {}
        self.ended: set[int] = set()
        self.bytes = 0
        self.started = time.monotonic()

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset):
            self.reset[event.stream_id] = (event.error_code, time.monotonic() - self.started)
        for h3_event in self.h3.handle_event(event):
            if isinstance(h3_event, DataReceived):
                self.bytes += len(h3_event.data)
            if isinstance(h3_event, (DataReceived, HeadersReceived)) and h3_event.stream_ended:
                self.ended.add(h3_event.stream_id)

    def get_many(self, path: str, authority: str, n: int) -> None:
        self.started = time.monotonic()
        for _ in range(n):
            sid = self._quic.get_next_available_stream_id()
            self.h3.send_headers(
                sid,
                [
                    (b":method", b"GET"),
                    (b":scheme", b"https"),
                    (b":authority", authority.encode()),
                    (b":path", path.encode()),
                ],
                end_stream=True,
            )
        self.transmit()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=H3_ALPN,
        server_name=args.server_name,
        verify_mode=ssl.CERT_REQUIRED,
        max_data=args.window,
        max_stream_data=args.window,
        idle_timeout=60.0,
    )
    config.load_verify_locations(cafile=args.ca)
    clients: list[Stalling] = []
    error = None
    try:
        managers = [
            connect(args.host, args.port, configuration=config, create_protocol=Stalling)
            for _ in range(args.connections)
        ]
        for m in managers:
            client = await m.__aenter__()
            assert isinstance(client, Stalling)
            client.get_many(args.path, args.authority, args.streams)
            clients.append(client)
        await asyncio.sleep(args.wait)
    except (ConnectionError, OSError, ssl.SSLError) as e:
        error = f"{type(e).__name__}: {e}"
    resets = [r for c in clients for r in c.reset.values()]
    times = [t for _, t in resets]
    return {
        "streams": args.connections * args.streams,
        "reset": len(resets),
        "reset_codes": sorted({code for code, _ in resets}),
        "ended": sum(len(c.ended) for c in clients),
        "bytes": sum(c.bytes for c in clients),
        "first_reset_s": round(min(times), 3) if times else None,
        "last_reset_s": round(max(times), 3) if times else None,
        "error": error,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--server-name", default="localhost")
    p.add_argument("--authority", default="localhost")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--streams", type=int, default=25)
    p.add_argument("--path", default=f"/size/{16 << 20}")
    p.add_argument("--window", type=int, default=256 * 1024, help="flow-control windows")
    p.add_argument("--wait", type=float, default=6.0)
    args = p.parse_args()
    result = asyncio.run(run(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

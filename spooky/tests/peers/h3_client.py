#!/usr/bin/env python3
"""A small HTTP/3 client on aioquic's public API, used by Spooky's tests as a client that
nobody on the team wrote.

It opens ONE QUIC connection (verifying the server's certificate with --ca) and runs batches
of requests on it: the requests of a batch are sent at once (in parallel on the connection),
and a batch starts when the previous one is over. Header names are sent exactly as given
(aioquic does not lowercase them), so malformed requests can be made on purpose.

Simple use, one batch of --parallel copies of one request:

    h3_client.py --port 4433 --ca ca.crt --path /size/100 --parallel 20

A plan (JSON, a list of batches, each a list of requests) for anything else:

    h3_client.py --port 4433 --ca ca.crt --plan '[[{"path": "/", "headers": [["Foo", "x"]]}],
                                               [{"path": "/size/5"}]]'

A request object has the keys `method` (GET), `scheme` (https), `authority` (the
--authority; null leaves `:authority` out), `path` (/), `headers` (a list of [name, value]
added after the pseudo-headers), `upload` (a body of that many bytes of the pattern
`i % 251`) and `fields` (a complete list of [name, value] that replaces the pseudo-headers
and `headers`).

Resumption and 0-RTT (`--resume N`): the first batch of the plan runs on a fresh connection,
which keeps the server's session ticket; then N new connections each resume with that ticket
and send the second batch at once, before their handshake completes (in 0-RTT when the
ticket allows it; `--hold-handshake S` makes those connections read nothing for S seconds,
so their handshake is surely incomplete while the server handles the early requests). The
JSON then also has "resumptions": one {"resumed", "early_data",
"responses", "error"} per resumed connection (`early_data`: the server accepted 0-RTT).

`--resume-host H` sends the resumed connections to another server (a fleet's other host).

Prints one JSON object: {"responses": [...], "error": null or text}. Responses are listed in
plan order, each {"status", "headers", "body_len", "sha256", "body", "ended", "reset", "trailers"}
(`body` is the text of bodies up to 64 KiB, null beyond):
`ended` is true when the stream ended cleanly, `reset` the error code of a RESET_STREAM from
the server (or null). The exit status is 0 when the connection stayed up for the whole plan,
1 otherwise (the JSON still says what happened).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import ssl
import sys
from typing import Any

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamReset

PATTERN_PERIOD = 251
BODY_SHOWN = 64 * 1024  # bodies up to this size are printed as text too


def pattern(n: int) -> bytes:
    """`n` bytes of the pattern `i % 251` (the same as Spooky's demo `/size/N`)."""
    block = bytes(range(PATTERN_PERIOD))
    return (block * (n // PATTERN_PERIOD + 1))[:n]


class Exchange:
    """What came back on one request stream."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.status: int | None = None
        self.headers: list[list[str]] = []
        self.trailers: list[list[str]] = []
        self.body_len = 0
        self.hash = hashlib.sha256()
        self.body = bytearray()
        self.ended = False
        self.reset: int | None = None
        self.done = loop.create_future()

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "headers": self.headers,
            "trailers": self.trailers,
            "body_len": self.body_len,
            "sha256": self.hash.hexdigest(),
            "body": (
                self.body.decode("utf-8", "replace")
                if self.body_len <= BODY_SHOWN
                else None
            ),
            "ended": self.ended,
            "reset": self.reset,
        }


def decode(pairs: list[tuple[bytes, bytes]]) -> list[list[str]]:
    return [[k.decode("latin-1"), v.decode("latin-1")] for k, v in pairs]


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.exchanges: dict[int, Exchange] = {}
        self.terminated: str | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset):
            ex = self.exchanges.get(event.stream_id)
            if ex is not None:
                ex.reset = event.error_code
                ex.finish()
        elif isinstance(event, ConnectionTerminated):
            self.terminated = (
                f"connection closed: error 0x{event.error_code:x} "
                f"frame {event.frame_type} reason {event.reason_phrase!r}"
            )
            for ex in self.exchanges.values():
                ex.finish()
        for h3_event in self.h3.handle_event(event):
            ex = self.exchanges.get(getattr(h3_event, "stream_id", -1))
            if ex is None:
                continue
            if isinstance(h3_event, HeadersReceived):
                fields = dict(h3_event.headers)
                status = fields.get(b":status")
                if ex.status is None and status is not None:
                    code = int(status)
                    if code >= 200:  # interim (1xx) answers are skipped
                        ex.status = code
                        ex.headers = decode(h3_event.headers)
                elif ex.status is not None:
                    ex.trailers = decode(h3_event.headers)
            elif isinstance(h3_event, DataReceived):
                ex.body_len += len(h3_event.data)
                ex.hash.update(h3_event.data)
                if ex.body_len <= BODY_SHOWN:
                    ex.body += h3_event.data
            if h3_event.stream_ended:
                ex.ended = True
                ex.finish()

    def start(self, req: dict[str, Any], default_authority: str) -> Exchange:
        if "fields" in req:
            fields = [(k.encode(), v.encode()) for k, v in req["fields"]]
        else:
            fields = [
                (b":method", req.get("method", "GET").encode()),
                (b":scheme", req.get("scheme", "https").encode()),
            ]
            authority = req.get("authority", default_authority)
            if authority is not None:
                fields.append((b":authority", authority.encode()))
            fields.append((b":path", req.get("path", "/").encode()))
            fields += [(k.encode(), v.encode()) for k, v in req.get("headers", [])]
        upload = int(req.get("upload", 0))
        stream_id = self._quic.get_next_available_stream_id()
        ex = Exchange(self._loop)
        self.exchanges[stream_id] = ex
        self.h3.send_headers(stream_id, fields, end_stream=upload == 0)
        if upload:
            self.h3.send_data(stream_id, pattern(upload), end_stream=True)
        self.transmit()
        return ex


def client_config(args: argparse.Namespace) -> QuicConfiguration:
    """HTTP/3, the server's certificate verified against --ca."""
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=H3_ALPN,
        server_name=args.server_name,
        verify_mode=ssl.CERT_REQUIRED,
        max_data=32 << 20,
        max_stream_data=16 << 20,
    )
    config.load_verify_locations(cafile=args.ca)
    return config


async def run(args: argparse.Namespace, plan: list[list[dict[str, Any]]]) -> dict[str, Any]:
    config = client_config(args)
    responses: list[dict[str, Any]] = []
    error: str | None = None
    try:
        async with connect(
            args.host, args.port, configuration=config, create_protocol=H3Client
        ) as client:
            assert isinstance(client, H3Client)
            for batch in plan:
                exchanges = [client.start(req, args.authority) for req in batch]
                try:
                    await asyncio.wait_for(
                        asyncio.gather(*(ex.done for ex in exchanges)), args.timeout
                    )
                except asyncio.TimeoutError:
                    error = f"timed out after {args.timeout}s"
                responses += [ex.to_json() for ex in exchanges]
                if client.terminated is not None:
                    error = client.terminated
                if error is not None:
                    break
            client.close()
    except (ConnectionError, OSError, ssl.SSLError) as e:
        error = f"{type(e).__name__}: {e}"
    return {"responses": responses, "error": error}


class HeldHandshake(H3Client):
    """A client that reads nothing from the server for its first `HOLD` seconds: its
    handshake cannot complete before then, so what it sent in 0-RTT is processed by the
    server as early data (on loopback the handshake would otherwise often be complete by the
    time the server looks at the requests)."""

    HOLD = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = self._loop.time() + self.HOLD

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self._loop.time() < self._release:
            # call_at keeps the datagrams in their order.
            self._loop.call_at(self._release, super().datagram_received, data, addr)
        else:
            super().datagram_received(data, addr)


async def run_resumed(args: argparse.Namespace, plan: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """The first batch on a fresh connection, the second in 0-RTT on `args.resume` resumed
    connections (see the module's docstring)."""
    tickets: list[Any] = []

    async def one(batch: list[dict[str, Any]], ticket: Any) -> dict[str, Any]:
        c = client_config(args)
        c.session_ticket = ticket
        out: dict[str, Any] = {"responses": [], "error": None, "resumed": False, "early_data": False}
        try:
            async with connect(
                args.host if ticket is None else (args.resume_host or args.host),
                args.port,
                configuration=c,
                create_protocol=H3Client if ticket is None else HeldHandshake,
                session_ticket_handler=tickets.append,
                wait_connected=ticket is None,
            ) as client:
                assert isinstance(client, H3Client)
                # With a ticket and no wait, these go out with the ClientHello: 0-RTT.
                exchanges = [client.start(req, args.authority) for req in batch]
                try:
                    await asyncio.wait_for(
                        asyncio.gather(*(ex.done for ex in exchanges)), args.timeout
                    )
                except asyncio.TimeoutError:
                    out["error"] = f"timed out after {args.timeout}s"
                out["responses"] = [ex.to_json() for ex in exchanges]
                tls = client._quic.tls
                out["resumed"] = bool(tls.session_resumed)
                out["early_data"] = bool(tls.early_data_accepted)
                if ticket is None:
                    # The ticket comes after the handshake: give it a moment.
                    for _ in range(100):
                        if tickets:
                            break
                        await asyncio.sleep(0.01)
                if client.terminated is not None:
                    out["error"] = client.terminated
                client.close()
        except (ConnectionError, OSError, ssl.SSLError) as e:
            out["error"] = f"{type(e).__name__}: {e}"
        return out

    HeldHandshake.HOLD = args.hold_handshake
    first = await one(plan[0], None)
    result: dict[str, Any] = {"responses": first["responses"], "error": first["error"], "resumptions": []}
    if first["error"] is not None:
        return result
    if not tickets:
        result["error"] = "the server sent no session ticket"
        return result
    for _ in range(args.resume):
        r = await one(plan[1], tickets[-1])
        result["resumptions"].append(r)
        if r["error"] is not None and result["error"] is None:
            result["error"] = f"resumed connection: {r['error']}"
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True, help="PEM trust anchors for the server certificate")
    p.add_argument("--server-name", default="localhost", help="SNI and name to verify")
    p.add_argument("--authority", default="localhost", help="default :authority")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per batch")
    p.add_argument("--plan", help="JSON list of batches of requests")
    p.add_argument("--method", default="GET")
    p.add_argument("--path", default="/")
    p.add_argument("--header", action="append", default=[], help="'name: value', sent as is")
    p.add_argument("--upload", type=int, default=0, help="body size in bytes")
    p.add_argument("--parallel", type=int, default=1, help="copies of the request at once")
    p.add_argument(
        "--hold-handshake",
        type=float,
        default=0.0,
        help="resumed connections read nothing from the server for this many seconds",
    )
    p.add_argument(
        "--resume",
        type=int,
        default=0,
        help="resumed connections sending the plan's second batch in 0-RTT",
    )
    p.add_argument(
        "--resume-host",
        help="where resumed connections go (another host of a fleet sharing ticket keys); default --host",
    )
    args = p.parse_args()
    if args.plan is not None:
        plan = json.loads(args.plan)
    else:
        headers = []
        for h in args.header:
            name, sep, value = h.partition(":")
            if not sep:
                p.error(f"--header {h!r}: expected 'name: value'")
            headers.append([name, value.strip()])
        req = {
            "method": args.method,
            "path": args.path,
            "headers": headers,
            "upload": args.upload,
        }
        plan = [[req] * args.parallel]
    if args.resume:
        if len(plan) != 2:
            p.error("--resume needs a plan of exactly two batches")
        result = asyncio.run(run_resumed(args, plan))
    else:
        result = asyncio.run(run(args, plan))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())

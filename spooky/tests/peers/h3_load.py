#!/usr/bin/env python3
"""A steady HTTP/3 load on aioquic's public API, for Spooky's restart and takeover tests: a
client that nobody on the team wrote, behaving like a well-mannered browser.

`--users` clients run at once. Each opens a connection (verifying the server's certificate
with --ca), sends `--per-connection` GETs of `--path` one after the other (`--pause` seconds
between a response and the next request), closes it and opens the next, until told to stop: a line `stop` (or end of file) on stdin. One more client
downloads `--download` bytes once (`/size/N`) and checks every byte.

It honours GOAWAY as RFC 9114 §5.2 asks: no new request on a connection that received one,
and a request on a stream the GOAWAY says was not processed is sent again on a new
connection (counted as `retried`). A connection the server closes while idle is replaced.
Everything else is a failure: an error status, a reset stream, a wrong body, a connection
closed under a request the server accepted, no answer within --timeout seconds (less than
the idle timeout, so a client left waiting one out fails), or a connection that cannot be
made.

Prints `started` on stdout once every user has had an answer and the download is under way,
then at the end one JSON object:

    {"ok": N, "retried": N, "failed": N, "failures": [first 20 reasons], "connections": N,
     "download": {"ok": bool, "bytes": N, "error": text or null}, "max_latency_s": x}

Exit status 0 when nothing failed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import ssl
import sys
import threading
import time
from typing import Any

from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, FrameType, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    QuicEvent,
    StreamDataReceived,
    StreamReset,
)

PATTERN_PERIOD = 251


def pattern_sha256(n: int) -> str:
    """SHA-256 of `n` bytes of the pattern `i % 251` (Spooky's demo `/size/N`)."""
    block = bytes(range(PATTERN_PERIOD)) * 4096
    h = hashlib.sha256()
    while n > 0:
        chunk = block[: min(n, len(block))]
        h.update(chunk)
        n -= len(chunk)
    return h.hexdigest()


def pull_varint(data: bytes, at: int) -> tuple[int, int] | None:
    """A QUIC variable-length integer at `at`: (value, next offset), or None if cut short."""
    if at >= len(data):
        return None
    size = 1 << (data[at] >> 6)
    if at + size > len(data):
        return None
    value = data[at] & 0x3F
    for b in data[at + 1 : at + size]:
        value = (value << 8) | b
    return value, at + size


class GoawayH3(H3Connection):
    """aioquic's HTTP/3 connection, remembering the stream id of a GOAWAY from the server
    (aioquic skips the frame without telling its user): the server's control stream is read
    here too, frame by frame."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.goaway: int | None = None
        self._uni: dict[int, bytearray] = {}

    def handle_event(self, event: QuicEvent) -> list[H3Event]:
        if isinstance(event, StreamDataReceived) and event.stream_id % 4 == 3:
            buf = self._uni.setdefault(event.stream_id, bytearray())
            buf += event.data
            self._read_control(buf)
        return super().handle_event(event)

    def _read_control(self, buf: bytearray) -> None:
        kind = pull_varint(buf, 0)
        if kind is None or kind[0] != 0:  # not (yet) the control stream
            return
        at = kind[1]
        while True:
            header = pull_varint(buf, at)
            if header is None:
                return
            length = pull_varint(buf, header[1])
            if length is None or length[1] + length[0] > len(buf):
                return
            payload = bytes(buf[length[1] : length[1] + length[0]])
            if header[0] == FrameType.GOAWAY:
                goaway = pull_varint(payload, 0)
                if goaway is not None:
                    self.goaway = goaway[0]
            del buf[kind[1] : length[1] + length[0]]


class Exchange:
    def __init__(self, loop: asyncio.AbstractEventLoop, stream_id: int) -> None:
        self.stream_id = stream_id
        self.status: int | None = None
        self.body_len = 0
        self.hash = hashlib.sha256()
        self.ended = False
        self.reset: int | None = None
        self.done = loop.create_future()

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class LoadClient(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = GoawayH3(self._quic)
        self.exchanges: dict[int, Exchange] = {}
        self.terminated: str | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset):
            ex = self.exchanges.get(event.stream_id)
            if ex is not None:
                ex.reset = event.error_code
                ex.finish()
        elif isinstance(event, ConnectionTerminated):
            self.terminated = f"error 0x{event.error_code:x} {event.reason_phrase!r}"
            for ex in self.exchanges.values():
                ex.finish()
        for h3_event in self.h3.handle_event(event):
            ex = self.exchanges.get(getattr(h3_event, "stream_id", -1))
            if ex is None:
                continue
            if isinstance(h3_event, HeadersReceived) and ex.status is None:
                status = dict(h3_event.headers).get(b":status")
                if status is not None and int(status) >= 200:
                    ex.status = int(status)
            elif isinstance(h3_event, DataReceived):
                ex.body_len += len(h3_event.data)
                ex.hash.update(h3_event.data)
            if h3_event.stream_ended:
                ex.ended = True
                ex.finish()

    def usable(self) -> bool:
        return self.terminated is None and self.h3.goaway is None

    def get(self, path: str, authority: str) -> Exchange:
        stream_id = self._quic.get_next_available_stream_id()
        ex = Exchange(self._loop, stream_id)
        self.exchanges[stream_id] = ex
        fields = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
        ]
        self.h3.send_headers(stream_id, fields, end_stream=True)
        self.transmit()
        return ex

    def not_processed(self, ex: Exchange) -> bool:
        """The server said (GOAWAY) it did not process this request: safe to send again."""
        return self.h3.goaway is not None and ex.stream_id >= self.h3.goaway and ex.status is None


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = asyncio.Event()
        self.ok = 0
        self.retried = 0
        self.failures: list[str] = []
        self.failed = 0
        self.connections = 0
        self.max_latency = 0.0
        self.answered: set[int] = set()
        self.download: dict[str, Any] = {"ok": False, "bytes": 0, "error": "not run"}
        self.download_started = asyncio.Event()
        self.want_sha = pattern_sha256(args.size)
        config = QuicConfiguration(
            is_client=True,
            alpn_protocols=H3_ALPN,
            server_name=args.server_name,
            verify_mode=ssl.CERT_REQUIRED,
            max_data=64 << 20,
            max_stream_data=32 << 20,
            idle_timeout=30.0,
        )
        config.load_verify_locations(cafile=args.ca)
        self.config = config

    def fail(self, why: str) -> None:
        self.failed += 1
        if len(self.failures) < 20:
            self.failures.append(why)

    def connect(self):  # an async context manager
        self.connections += 1
        return connect(
            self.args.host,
            self.args.port,
            configuration=self.config,
            create_protocol=LoadClient,
            wait_connected=True,
        )

    async def user(self, n: int) -> None:
        path = f"/size/{self.args.size}"
        while not self.stop.is_set():
            try:
                async with self.connect() as client:
                    assert isinstance(client, LoadClient)
                    sent = 0
                    while (
                        sent < self.args.per_connection
                        and not self.stop.is_set()
                        and client.usable()
                    ):
                        sent += 1
                        started = time.monotonic()
                        ex = client.get(path, self.args.authority)
                        try:
                            await asyncio.wait_for(ex.done, self.args.timeout)
                        except asyncio.TimeoutError:
                            self.fail(f"user {n}: no answer within {self.args.timeout}s")
                            return
                        self.max_latency = max(self.max_latency, time.monotonic() - started)
                        await asyncio.sleep(self.args.pause)
                        if client.not_processed(ex):
                            self.retried += 1
                        elif ex.status == 200 and ex.ended and ex.body_len == self.args.size:
                            if ex.hash.hexdigest() == self.want_sha:
                                self.ok += 1
                                self.answered.add(n)
                            else:
                                self.fail(f"user {n}: body differs")
                        elif ex.status is None and ex.reset is None and client.terminated:
                            self.fail(
                                f"user {n}: connection closed under request {ex.stream_id} "
                                f"(GOAWAY {client.h3.goaway}): {client.terminated}"
                            )
                        else:
                            self.fail(
                                f"user {n}: status {ex.status} ended {ex.ended} "
                                f"reset {ex.reset} bytes {ex.body_len}"
                            )
                    client.close()
            except (ConnectionError, OSError, ssl.SSLError, asyncio.TimeoutError) as e:
                self.fail(f"user {n}: cannot connect: {type(e).__name__}: {e}")
                await asyncio.sleep(0.2)

    async def download_once(self) -> None:
        if self.args.download == 0:
            self.download = {"ok": True, "bytes": 0, "error": None}
            return
        want = pattern_sha256(self.args.download)
        try:
            async with self.connect() as client:
                assert isinstance(client, LoadClient)
                ex = client.get(f"/size/{self.args.download}", self.args.authority)
                deadline = time.monotonic() + self.args.download_within
                while not ex.done.done() and time.monotonic() < deadline:
                    if ex.body_len > 0:
                        self.download_started.set()
                    await asyncio.sleep(0.01)
                self.download_started.set()
                ok = (
                    ex.status == 200
                    and ex.ended
                    and ex.body_len == self.args.download
                    and ex.hash.hexdigest() == want
                )
                error = None if ok else (
                    f"status {ex.status} ended {ex.ended} reset {ex.reset} "
                    f"bytes {ex.body_len} connection {client.terminated}"
                )
                self.download = {"ok": ok, "bytes": ex.body_len, "error": error}
                client.close()
        except (ConnectionError, OSError, ssl.SSLError) as e:
            self.download_started.set()
            self.download = {"ok": False, "bytes": 0, "error": f"{type(e).__name__}: {e}"}

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()

        def watch_stdin() -> None:
            for line in sys.stdin:
                if line.strip() == "stop":
                    break
            loop.call_soon_threadsafe(self.stop.set)

        threading.Thread(target=watch_stdin, daemon=True).start()
        tasks = [asyncio.create_task(self.user(n)) for n in range(self.args.users)]
        download = asyncio.create_task(self.download_once())
        while len(self.answered) < self.args.users and not self.stop.is_set():
            await asyncio.sleep(0.05)
        await self.download_started.wait()
        print("started", flush=True)
        await self.stop.wait()
        await asyncio.gather(*tasks, download)
        return {
            "ok": self.ok,
            "retried": self.retried,
            "failed": self.failed,
            "failures": self.failures,
            "connections": self.connections,
            "download": self.download,
            "max_latency_s": round(self.max_latency, 3),
        }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--server-name", default="localhost")
    p.add_argument("--authority", default="localhost")
    p.add_argument("--users", type=int, default=24)
    p.add_argument("--per-connection", type=int, default=20)
    p.add_argument("--size", type=int, default=2000, help="bytes per GET")
    p.add_argument("--download", type=int, default=64 << 20, help="bytes, 0: none")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds per request")
    p.add_argument("--pause", type=float, default=0.05, help="seconds between requests")
    p.add_argument(
        "--download-within", type=float, default=280.0, help="seconds for the download"
    )
    args = p.parse_args()
    result = asyncio.run(Load(args).run())
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if result["failed"] == 0 and result["download"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

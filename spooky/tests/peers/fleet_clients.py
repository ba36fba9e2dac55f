#!/usr/bin/env python3
"""HTTP/3 clients that change their source port, on aioquic's sans-IO API (no code of
Spooky's): the NAT rebinding that, behind an ECMP router hashing on ports, sends a
connection's packets to another host of a fleet.

    fleet_clients.py --host VIP --port 443 --ca ca.crt --connections 50 --seconds 20

Each connection is one `QuicConnection` driven over plain UDP sockets. Every --every
seconds it closes its socket, opens a new one (a new source port: what a NAT rebinding
looks like to the server) and sends one GET /c<connection>/r<request>, then waits for the
answer (status and body checked against what the backend says: `hello from ID: GET PATH`,
with the same ID for every request of the connection, since its connection lives on one
host). After --seconds no new request starts; answers still due are waited for.

With --quic-lb ROTATION:KEY:SID_LEN:NONCE_LEN it also reads, as a QUIC-LB load balancer
with that configuration would (quic_lb.py's decoder, written from the draft), the server id
of every connection ID each connection was given, and counts as a failure any that does not
name the host that answered (backend `hN` is server id N) or carries another codepoint.

Prints one JSON object: {"ok": n, "failed": n, "failures": [first few], "rebinds": n,
"connections": {index: backend id}, "server_cids_checked": n} and exits 0 when nothing
failed.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import ssl
import sys
import time

from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated

ANSWER_WITHIN = 10.0  # seconds a request may take before it counts as failed


class Client:
    def __init__(self, index: int, args: argparse.Namespace, start: float) -> None:
        self.index = index
        self.server = (args.host, args.port)
        config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN)
        config.load_verify_locations(args.ca)
        config.server_name = args.server_name
        config.verify_mode = ssl.CERT_REQUIRED
        config.idle_timeout = 60.0
        self.quic = QuicConnection(configuration=config)
        self.h3 = H3Connection(self.quic)
        self.sock = self._socket()
        self.quic.connect(self.server, now=time.monotonic())
        # Spread the clients over the first period.
        self.next_request = start + args.every * index / max(args.connections, 1)
        self.requests = 0
        self.pending: dict[int, dict] = {}  # stream id -> request state
        self.backend: str | None = None
        self.closed: str | None = None
        self.rebinds = 0
        self.server_cids: set[bytes] = set()

    def _socket(self) -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ":" in self.server[0] else socket.AF_INET,
                          socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind(("", 0))
        return s

    def rebind(self) -> None:
        self.sock.close()
        self.sock = self._socket()
        self.rebinds += 1

    def flush(self, now: float) -> None:
        for data, addr in self.quic.datagrams_to_send(now=now):
            try:
                self.sock.sendto(data, addr)
            except OSError:
                pass

    def start_request(self, now: float, report: dict) -> None:
        path = f"/c{self.index}/r{self.requests}"
        self.requests += 1
        stream = self.quic.get_next_available_stream_id()
        self.h3.send_headers(stream, [
            (b":method", b"GET"), (b":scheme", b"https"),
            (b":authority", self.server_name_bytes()), (b":path", path.encode()),
        ], end_stream=True)
        self.pending[stream] = {"path": path, "status": None, "body": b"", "since": now}

    def server_name_bytes(self) -> bytes:
        return (self.quic.configuration.server_name or self.server[0]).encode()

    def receive(self, now: float, report: dict) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
            except (BlockingIOError, OSError):
                break
            self.quic.receive_datagram(data, addr, now=now)
        self.events(now, report)

    def events(self, now: float, report: dict) -> None:
        while (ev := self.quic.next_event()) is not None:
            if isinstance(ev, ConnectionTerminated):
                self.closed = (f"connection closed after {self.requests} requests: error {ev.error_code}, "
                               f"frame type {ev.frame_type}, reason {ev.reason_phrase!r}")
            for h in self.h3.handle_event(ev):
                req = self.pending.get(getattr(h, "stream_id", -1))
                if req is None:
                    continue
                if isinstance(h, HeadersReceived):
                    req["status"] = dict(h.headers).get(b":status", b"").decode()
                elif isinstance(h, DataReceived):
                    req["body"] += h.data
                if getattr(h, "stream_ended", False):
                    del self.pending[h.stream_id]
                    self.check(req, report)

    def check(self, req: dict, report: dict) -> None:
        body = req["body"].decode(errors="replace")
        prefix = "hello from "
        ok = req["status"] == "200" and body.startswith(prefix)
        if ok:
            backend = body[len(prefix):].split(":", 1)[0]
            ok = body == f"{prefix}{backend}: GET {req['path']}\n"
            if ok and self.backend not in (None, backend):
                ok = False
                body = f"answered by {backend}, earlier requests by {self.backend}"
            self.backend = self.backend or backend
        if ok:
            report["ok"] += 1
        else:
            fail(report, f"c{self.index} {req['path']}: status {req['status']}, body {body!r}")

    def note_server_cids(self) -> None:
        """The connection IDs the server gave this connection so far (aioquic's state), not
        the one the client chose for its first Initial."""
        chosen = self.quic.original_destination_connection_id
        cids = [self.quic._peer_cid.cid] + [c.cid for c in self.quic._peer_cid_available]
        self.server_cids.update(c for c in cids if c != chosen)

    def tick(self, now: float, end: float, args: argparse.Namespace, report: dict) -> None:
        self.note_server_cids()
        timer = self.quic.get_timer()
        if timer is not None and timer <= now:
            self.quic.handle_timer(now=now)
            self.events(now, report)
        for stream, req in list(self.pending.items()):
            if now - req["since"] > ANSWER_WITHIN:
                del self.pending[stream]
                fail(report, f"c{self.index} {req['path']}: no answer in {ANSWER_WITHIN}s")
        if self.closed is None and now >= self.next_request and now < end:
            if self.requests > 0:
                self.rebind()
            self.start_request(now, report)
            self.next_request += args.every
        self.flush(now)


def fail(report: dict, what: str) -> None:
    report["failed"] += 1
    if len(report["failures"]) < 20:
        report["failures"].append(what)


def check_server_cids(c: Client, config: str, report: dict) -> None:
    """Reads each connection ID the server issued as a QUIC-LB load balancer would: the
    codepoint must be the configured one and the server id the answering host's."""
    from quic_lb import decode

    rotation, key, sid_len, nonce_len = config.split(":")
    sid_len, nonce_len = int(sid_len), int(nonce_len)
    want = int(c.backend.lstrip("h")).to_bytes(sid_len, "big")
    for cid in c.server_cids:
        report["server_cids_checked"] += 1
        sid, _ = decode(cid, sid_len, nonce_len, bytes.fromhex(key))
        if cid[0] >> 5 != int(rotation) or sid != want:
            fail(report, f"c{c.index}: connection ID {cid.hex()} names server {sid.hex()} "
                         f"(codepoint {cid[0] >> 5}), the connection is on {c.backend}")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--server-name", default="localhost")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--every", type=float, default=1.0)
    p.add_argument("--quic-lb", default=None, help="ROTATION:KEY_HEX:SID_LEN:NONCE_LEN")
    args = p.parse_args()

    report = {"ok": 0, "failed": 0, "failures": [], "rebinds": 0, "connections": {}}
    start = time.monotonic()
    end = start + args.seconds
    clients = [Client(i, args, start) for i in range(args.connections)]
    while True:
        now = time.monotonic()
        for c in clients:
            c.tick(now, end, args, report)
        live = [c for c in clients if c.closed is None]
        if now >= end and not any(c.pending for c in clients):
            break
        if now >= end + ANSWER_WITHIN + 1:
            break
        socks = {c.sock: c for c in live}
        timers = [t for c in live if (t := c.quic.get_timer()) is not None]
        wait = min([0.05] + [max(0.0, t - now) for t in timers])
        readable, _, _ = select.select(list(socks), [], [], wait)
        now = time.monotonic()
        for s in readable:
            socks[s].receive(now, report)
    report["server_cids_checked"] = 0
    for c in clients:
        report["rebinds"] += c.rebinds
        report["connections"][c.index] = c.backend
        if c.closed is not None:
            fail(report, f"c{c.index}: {c.closed}")
        if args.quic_lb and c.backend:
            check_server_cids(c, args.quic_lb, report)
        c.quic.close()
        c.flush(time.monotonic())
    print(json.dumps(report))
    return 0 if report["failed"] == 0 and report["ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())

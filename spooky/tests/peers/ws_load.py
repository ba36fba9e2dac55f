"""WebSocket load through a proxy's TCP listener, for `cargo xtask bench` (`ws-small`,
`ws-bulk`): CONNECTIONS WebSockets (the `websockets` package, HTTP/1.1 upgrade over TLS,
the certificate verified with CA), each keeping INFLIGHT binary messages of SIZE bytes
outstanding against an echo server behind the proxy for SECONDS. Every echo is checked
against what was sent; its round trip is timed from the send to the echo's arrival.

Prints one JSON line: messages echoed, bytes echoed, the window in seconds, round-trip
percentiles in ms, connections that failed (with the first error) and mismatched echoes.

Run: python3 ws_load.py --port P --ca CA [--connections 10] [--inflight 16] [--size 128]
     [--seconds 10] [--path /]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import ssl
import sys
import time

from websockets.asyncio.client import connect


class Totals:
    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0
        self.mismatched = 0
        self.failed = 0
        self.first_error: str | None = None
        self.rtts: list[float] = []


async def one(args, ctx: ssl.SSLContext, deadline: float, t: Totals, tag: int) -> None:
    # Each connection's payload differs, so an echo sent to the wrong client is caught.
    payload = bytes((i + tag) % 251 for i in range(args.size))
    try:
        async with connect(
            f"wss://localhost:{args.port}{args.path}",
            ssl=ctx,
            subprotocols=["echo"],
            max_size=None,
            compression=None,
            open_timeout=10,
            ping_interval=None,
        ) as ws:
            slots = asyncio.Semaphore(args.inflight)
            sent: collections.deque[float] = collections.deque()

            async def sender() -> None:
                while time.monotonic() < deadline:
                    await slots.acquire()
                    sent.append(time.monotonic())
                    await ws.send(payload)

            task = asyncio.create_task(sender())
            try:
                while not (task.done() and not sent):
                    got = await asyncio.wait_for(ws.recv(), 30)
                    now = time.monotonic()
                    t.rtts.append(now - sent.popleft())
                    if got != payload:
                        t.mismatched += 1
                    t.messages += 1
                    t.bytes += len(got)
                    slots.release()
                await task
            finally:
                task.cancel()
    except Exception as e:  # noqa: BLE001 - every failure is counted and the first named
        t.failed += 1
        if t.first_error is None:
            t.first_error = f"{type(e).__name__}: {e}"


async def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--inflight", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--path", default="/")
    args = p.parse_args()
    ctx = ssl.create_default_context(cafile=args.ca)
    t = Totals()
    start = time.monotonic()
    deadline = start + args.seconds
    await asyncio.gather(*(one(args, ctx, deadline, t, i) for i in range(args.connections)))
    elapsed = time.monotonic() - start
    rtts = sorted(t.rtts)

    def pct(q: float) -> float | None:
        return rtts[min(len(rtts) - 1, int(q * len(rtts)))] * 1000 if rtts else None

    print(
        json.dumps(
            {
                "messages": t.messages,
                "bytes": t.bytes,
                "seconds": elapsed,
                "p50_ms": pct(0.50),
                "p90_ms": pct(0.90),
                "p99_ms": pct(0.99),
                "failed": t.failed,
                "first_error": t.first_error,
                "mismatched": t.mismatched,
            }
        ),
        flush=True,
    )
    return 0 if t.failed == 0 and t.mismatched == 0 and t.messages > 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

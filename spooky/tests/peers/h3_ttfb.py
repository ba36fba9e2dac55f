#!/usr/bin/env python3
"""Time to first byte over HTTP/3 with aioquic: a full handshake against a resumed connection
that sends its request in 0-RTT (used by `cargo xtask bench`, scenario `zero-rtt`).

Each mode opens --count connections one after the other and sends one GET on each:

- `full`: no session ticket; the request goes once the handshake is complete;
- `zero_rtt`: the newest session ticket the server gave; the request goes with the
  ClientHello (0-RTT when the server accepts early data, else after the handshake).

The time is taken from just before the connection starts to the response head. Prints one
JSON object: {"full": {...}, "zero_rtt": {...}}, each with "n", "p50_ms", "p90_ms", "p99_ms",
"resumed" and "early_data" (connections that resumed, and whose early data was accepted),
"failed", "statuses" (response statuses seen).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import time
from typing import Any

from aioquic.asyncio import connect

from h3_client import H3Client, client_config


class Timed(H3Client):
    """Notes when each exchange's response head arrives."""

    def quic_event_received(self, event: Any) -> None:
        super().quic_event_received(event)
        now = time.perf_counter()
        for ex in self.exchanges.values():
            if ex.status is not None and not hasattr(ex, "head_at"):
                ex.head_at = now


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


async def one(args: argparse.Namespace, ticket: Any, tickets: list[Any]) -> dict[str, Any]:
    config = client_config(args)
    config.session_ticket = ticket
    started = time.perf_counter()
    out: dict[str, Any] = {"ttfb_ms": None, "status": None, "resumed": False, "early_data": False}
    try:
        async with connect(
            args.host,
            args.port,
            configuration=config,
            create_protocol=Timed,
            session_ticket_handler=tickets.append,
            wait_connected=ticket is None,
        ) as client:
            assert isinstance(client, Timed)
            ex = client.start({"path": args.path}, args.server_name)
            await asyncio.wait_for(ex.done, 10)
            out["status"] = ex.status
            if hasattr(ex, "head_at"):
                out["ttfb_ms"] = (ex.head_at - started) * 1000
            tls = client._quic.tls
            out["resumed"] = bool(tls.session_resumed)
            out["early_data"] = bool(tls.early_data_accepted)
            # Let the session ticket arrive before closing (it follows the handshake).
            for _ in range(100):
                if tickets:
                    break
                await asyncio.sleep(0.005)
            client.close()
    except (ConnectionError, OSError, ssl.SSLError, asyncio.TimeoutError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r["ttfb_ms"] for r in rows if r["status"] == 200 and r["ttfb_ms"] is not None]
    return {
        "n": len(ok),
        "failed": len(rows) - len(ok),
        "p50_ms": percentile(ok, 50),
        "p90_ms": percentile(ok, 90),
        "p99_ms": percentile(ok, 99),
        "resumed": sum(1 for r in rows if r["resumed"]),
        "early_data": sum(1 for r in rows if r["early_data"]),
        "statuses": sorted({str(r["status"]) for r in rows}),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tickets: list[Any] = []
    full = [await one(args, None, tickets) for _ in range(args.count)]
    early = []
    for _ in range(args.count):
        early.append(await one(args, tickets[-1] if tickets else None, tickets))
    return {"full": summary(full), "zero_rtt": summary(early)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--server-name", default="localhost")
    p.add_argument("--path", default="/100b")
    p.add_argument("--count", type=int, default=200)
    args = p.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()

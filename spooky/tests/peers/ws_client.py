"""A WebSocket client (the `websockets` package) against Spooky's TCP listener (HTTP/1.1
upgrade over TLS, verified with the demo CA). Sends COUNT binary messages of SIZE bytes (a
byte pattern), checks each echo, then one text message; then closes (`client`) or asks the
server to (`server`), or (`hold`) prints `open`, waits for a line on stdin, sends one more
message, checks its echo, and waits for the connection to be closed under it. Prints one
JSON line: what it saw.

Run: python3 ws_client.py PORT CA_FILE PATH COUNT SIZE CLOSER
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


async def main() -> int:
    port, ca, path, count, size, closer = sys.argv[1:7]
    count, size = int(count), int(size)
    ctx = ssl.create_default_context(cafile=ca)
    result: dict = {"echoed": 0, "bytes": 0}
    async with connect(
        f"wss://localhost:{port}{path}",
        ssl=ctx,
        subprotocols=["echo"],
        max_size=None,
        compression=None,
        open_timeout=10,
    ) as ws:
        result["subprotocol"] = ws.subprotocol
        payload = bytes(i % 251 for i in range(size))
        # Pipelined: many messages in flight at once, read back in order.

        async def sender() -> None:
            for _ in range(count):
                await ws.send(payload)

        task = asyncio.create_task(sender())
        for _ in range(count):
            got = await asyncio.wait_for(ws.recv(), 30)
            if got != payload:
                result["mismatch"] = True
                break
            result["echoed"] += 1
            result["bytes"] += len(got)
        await task
        await ws.send("hello text")
        result["text"] = await asyncio.wait_for(ws.recv(), 10)
        if closer == "hold":
            print("open", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            try:
                await ws.send("after the line")
                result["late_echo"] = await asyncio.wait_for(ws.recv(), 10)
                await asyncio.wait_for(ws.recv(), 60)
            except ConnectionClosed as e:
                result["closed"] = True
                result["close_code"] = e.rcvd.code if e.rcvd else None
        elif closer == "server":
            await ws.send("close-from-server")
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except ConnectionClosed as e:
                result["close_code"] = e.rcvd.code if e.rcvd else None
        else:
            await ws.close(1000, "client says bye")
            result["close_code"] = ws.close_code
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

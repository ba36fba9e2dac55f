"""A WebSocket echo server (the `websockets` package, HTTP/1.1 upgrade) as a backend in
Spooky's tests. Every message comes back as it was sent (text as text, binary as binary);
the text message `close-from-server` makes the server close with code 4001 instead.
It accepts the subprotocol `echo` when the client offers it. With `--plain-ok`, a request
that asks for no upgrade is answered `200 ok` (a proxy's readiness probe in the benchmark)
instead of `426`.

Run: python3 ws_echo_server.py PORT [--plain-ok]
"""

from __future__ import annotations

import asyncio
import logging
import sys
from http import HTTPStatus

from websockets.asyncio.server import serve


async def echo(ws) -> None:
    async for message in ws:
        if message == "close-from-server":
            await ws.close(4001, "server says bye")
            return
        await ws.send(message)


async def main() -> None:
    port = int(sys.argv[1])
    plain_ok = "--plain-ok" in sys.argv[2:]

    def plain(connection, request):
        if plain_ok and "upgrade" not in request.headers.get("Connection", "").lower():
            return connection.respond(HTTPStatus.OK, "ok\n")
        return None

    # Handshakes it refuses are logged with the reason (the test shows the log on failure).
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    async with serve(
        echo,
        "127.0.0.1",
        port,
        subprotocols=["echo"],
        max_size=None,
        compression=None,
        process_request=plain,
    ) as server:
        print(f"listening on {port}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())

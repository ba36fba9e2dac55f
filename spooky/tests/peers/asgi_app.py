"""A tiny ASGI app served by hypercorn (a strict HTTP/2 server) as a backend in Spooky's tests.

Routes:

| path | answer |
|---|---|
| `/health` | 200 `ok` |
| `/upload` | 200 JSON `{"length": N, "sha256": HEX}` of the request body |
| any path, WebSocket | echoes every message |
| anything else | 200 JSON `{"method", "path", "query", "authority", "http_version", "headers"}` |

`authority` is what hypercorn hands the app as `host`: the request's `:authority` (hypercorn
folds `:authority` into `host`), and `headers` is the list of [name, value] it saw.

Run: hypercorn --bind 127.0.0.1:PORT --app-dir spooky/tests/peers asgi_app:app
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Awaitable, Callable

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def respond(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"x-backend", b"hypercorn"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def websocket_echo(receive: Receive, send: Send) -> None:
    """Accepts, then echoes every message (text or bytes) until the client closes."""
    while True:
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
        elif message["type"] == "websocket.receive":
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"]})
        elif message["type"] == "websocket.disconnect":
            return


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await websocket_echo(receive, send)
        return
    if scope["type"] != "http":
        return

    length = 0
    digest = hashlib.sha256()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        length += len(chunk)
        digest.update(chunk)
        if not message.get("more_body", False):
            break

    path = scope["path"]
    if path == "/health":
        await respond(send, 200, b"ok\n", "text/plain")
        return
    if path == "/upload":
        answer: dict[str, Any] = {"length": length, "sha256": digest.hexdigest()}
    else:
        headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
        answer = {
            "method": scope["method"],
            "path": path,
            "query": scope["query_string"].decode("latin-1"),
            "authority": next((v for k, v in headers if k == "host"), None),
            "http_version": scope["http_version"],
            "headers": headers,
        }
    await respond(send, 200, json.dumps(answer).encode(), "application/json")

"""Opens a TCP connection to Spooky's TLS listener with a PROXY protocol header (HAProxy's
v1 text line or v2 binary header) naming a client address, then does one HTTP/1.1 request
over TLS and prints the response (status line, then body).

Run: python3 proxy_protocol_client.py PORT CA_FILE VERSION CLIENT_IP CLIENT_PORT PATH
VERSION is 1, 2, 2-local (a v2 LOCAL header: the balancer's own check) or none.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import struct
import sys


def header(version: str, ip: str, port: int, dst_port: int) -> bytes:
    addr = ipaddress.ip_address(ip)
    if version == "none":
        return b""
    if version == "1":
        family = "TCP4" if addr.version == 4 else "TCP6"
        dst = "127.0.0.1" if addr.version == 4 else "::1"
        return f"PROXY {family} {ip} {dst} {port} {dst_port}\r\n".encode()
    signature = b"\r\n\r\n\x00\r\nQUIT\n"
    if version == "2-local":
        return signature + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    if addr.version == 4:
        body = addr.packed + ipaddress.ip_address("127.0.0.1").packed + struct.pack("!HH", port, dst_port)
        return signature + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body
    body = addr.packed + ipaddress.ip_address("::1").packed + struct.pack("!HH", port, dst_port)
    return signature + bytes([0x21, 0x21]) + struct.pack("!H", len(body)) + body


def main() -> int:
    port, ca, version, ip, client_port, path = sys.argv[1:7]
    raw = socket.create_connection(("127.0.0.1", int(port)), timeout=10)
    raw.sendall(header(version, ip, int(client_port), int(port)))
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        tls.sendall(f"GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    except (ssl.SSLError, OSError) as e:
        print(f"refused: {e}")
        return 3
    head, _, body = data.partition(b"\r\n\r\n")
    print(head.split(b"\r\n")[0].decode())
    sys.stdout.write(body.decode(errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

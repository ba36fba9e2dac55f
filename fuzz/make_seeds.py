#!/usr/bin/env python3
"""Writes the committed seed corpus: fuzz/corpus/{cid,request_head,response_head,endpoint,config}/.

Run it from anywhere (`python3 fuzz/make_seeds.py`); it replaces the seeds it owns and leaves
other files alone. The formats are described at the top of each fuzz target. The config seeds
are the YAML files shipped in config/ plus a few written here.
"""

import pathlib
import shutil
import struct

FUZZ = pathlib.Path(__file__).resolve().parent
ROOT = FUZZ.parent
CORPUS = FUZZ / "corpus"


def write(target, name, data):
    path = CORPUS / target / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# --- cid ---------------------------------------------------------------------------------

def preamble(cid_len=16, sid_len=2, generation=0, workers=4, worker=2, out_len=20):
    return bytes([cid_len, sid_len, generation]) + struct.pack("<H", workers) + bytes([worker, out_len])


def our_cid(worker, cid_len=16, server_id=b"\x00\x01", generation=0):
    """A connection ID in Spooky's layout (QUIC-LB plaintext): octet, server id, worker, nonce."""
    first = (generation << 5) | (cid_len - 1)
    nonce_len = cid_len - 1 - len(server_id) - 1
    nonce = bytes((0x5a + 17 * i) & 0xFF for i in range(nonce_len))
    return bytes([first]) + server_id + bytes([worker]) + nonce


CLIENT_DCID = bytes.fromhex("8394c8f03e515708")  # the client DCID of RFC 9001 appendix A
CLIENT_SCID = bytes.fromhex("c6b336557ae6d5f8")


def long_header(first, version, dcid, scid, rest):
    return bytes([first]) + struct.pack(">I", version) + bytes([len(dcid)]) + dcid + bytes([len(scid)]) + scid + rest


def initial_v1(size=1200):
    # RFC 9001 A.2: c3 00000001 08 <dcid> 00 00 449e 7b9aec34, then the protected payload
    # (zeros here: only the header matters to steering), one 1200-byte datagram.
    head = long_header(0xC3, 1, CLIENT_DCID, b"", bytes.fromhex("00449e") + bytes.fromhex("7b9aec34"))
    return (head + bytes(size)).ljust(size, b"\0")[:size]


def initial_v2(size=1200):
    # RFC 9369: version 0x6b3343cf, Initial is long-header type 0b01.
    head = long_header(0xD3, 0x6B3343CF, CLIENT_DCID, CLIENT_SCID, bytes.fromhex("00449e") + bytes(4))
    return (head + bytes(size))[:size]


def handshake_ours(worker):
    return long_header(0xE2, 1, our_cid(worker), CLIENT_SCID, bytes.fromhex("4040") + bytes(3) + bytes(61))


def zero_rtt():
    return long_header(0xD1, 1, CLIENT_DCID, CLIENT_SCID, bytes.fromhex("4020") + bytes(34))


def short_ours(worker, cid=None):
    return bytes([0x43]) + (cid or our_cid(worker)) + bytes.fromhex("1a2b3c4d") + bytes(24)


def ethernet(ether_type, payload, tags=()):
    frame = bytes.fromhex("020000000001") + bytes.fromhex("020000000002")
    for tpid, vid in tags:
        frame += struct.pack(">H", tpid) + struct.pack(">H", vid)
    return frame + struct.pack(">H", ether_type) + payload


def udp(payload, dport=9889, sport=50000):
    return struct.pack(">HHHH", sport, dport, 8 + len(payload), 0) + payload


def ipv4(payload, options=b"", frag=0x4000):
    ihl = 5 + len(options) // 4
    head = struct.pack(">BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(payload), 0x1234, frag, 64, 17, 0,
                       bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
    return head + options + payload


def ipv6(payload):
    src = bytes.fromhex("20010db8000000000000000000000001")
    dst = bytes.fromhex("20010db8000000000000000000000002")
    return struct.pack(">IHBB", 0x60000000, len(payload), 17, 64) + src + dst + payload


def cid_seeds():
    p = preamble()
    write("cid", "short-header-our-worker-2", p + short_ours(2))
    write("cid", "short-header-worker-beyond-live", p + short_ours(9))
    write("cid", "initial-v1-rfc9001", p + initial_v1())
    write("cid", "initial-v1-short-datagram", p + initial_v1(1199))
    write("cid", "initial-v2", p + initial_v2())
    write("cid", "handshake-our-worker-3", p + handshake_ours(3))
    write("cid", "zero-rtt-client-dcid", p + zero_rtt())
    write("cid", "unknown-version", p + long_header(0xC0, 0x1A2A3A4A, CLIENT_DCID, CLIENT_SCID, bytes(16)))
    write("cid", "dcid-longer-than-20", p + bytes([0xC3]) + struct.pack(">I", 1) + bytes([21]) + bytes(range(21)))
    write("cid", "fixed-bit-clear", p + bytes([0x03]) + our_cid(1) + bytes(20))
    lookalike = our_cid(200)
    write("cid", "client-dcid-looks-like-ours", p + long_header(0xC3, 1, lookalike, b"", bytes(1200))[:1200])
    unroutable = bytes([0xE0 | 15]) + our_cid(1)[1:]
    write("cid", "unroutable-generation", p + long_header(0xC3, 1, unroutable, b"", bytes(1200))[:1200])
    write("cid", "truncated-long-header", p + initial_v1()[:10])
    # Known bugs (reported). A client's 20-byte Initial DCID that starts like one of ours
    # (octet 0x0f, server id 0001, worker 2): steer says worker 2, the cBPF program hashes (1).
    lookalike20 = bytes.fromhex("0f000102") + bytes(16)
    write("cid", "known-bug-long-lookalike",
          p + long_header(0xC3, 1, lookalike20, b"", bytes.fromhex("00449e") + bytes(1200))[:1200])
    # An empty UDP datagram in a minimum-size (padded) Ethernet frame.
    write("cid", "known-bug-empty-udp-payload", p + ethernet(0x0800, ipv4(udp(b""))) + bytes(18))
    # Other layouts: the longest ID with the longest server id, and the shortest.
    big = our_cid(250, cid_len=20, server_id=bytes(range(1, 9)), generation=6)
    write("cid", "layout-20-8-gen6", preamble(20, 8, 6, 255, 250, 40) + short_ours(250, big))
    small = our_cid(0, cid_len=7, server_id=b"\x07", generation=3)
    write("cid", "layout-7-1-gen3", preamble(7, 1, 3, 1, 0, 7) + short_ours(0, small))
    write("cid", "layout-illegal", preamble(21, 0, 7, 0, 0, 0) + initial_v1())
    # The load balancer's layout (generation byte's top bit): first octet the balancer's,
    # server id, generation and worker in the nonce, then again as the last two bytes.
    lb = bytes([0x40, 0x00, 0x01, 2, 3]) + bytes(range(9)) + bytes([2, 3])
    write("cid", "layout-lb-16-2-gen2", preamble(16, 2, 0x82, 4, 3, 20) + short_ours(3, lb))
    # Whole frames, for the XDP walk.
    write("cid", "frame-ipv4-short-header", p + ethernet(0x0800, ipv4(udp(short_ours(1)))))
    write("cid", "frame-qinq-ipv6-initial",
          p + ethernet(0x86DD, ipv6(udp(initial_v1())), tags=((0x88A8, 100), (0x8100, 200))))
    write("cid", "frame-ipv4-options-handshake",
          p + ethernet(0x0800, ipv4(udp(handshake_ours(0)), options=bytes.fromhex("01010100"))))
    write("cid", "frame-ipv4-fragment", p + ethernet(0x0800, ipv4(udp(zero_rtt()), frag=0x2000)))


# --- request_head ------------------------------------------------------------------------

APPEND, REPLACE, OFF = 0, 1, 2
VIA, IPV6 = 4, 8


def head(hop, fields):
    out = bytes([hop])
    for name, value in fields:
        name, value = name.encode(), value.encode()
        assert len(name) < 256 and len(value) < 256
        out += bytes([len(name)]) + name + bytes([len(value)]) + value
    return out


def request_head_seeds():
    write("request_head", "browser-get", head(APPEND | VIA, [
        (":method", "GET"), (":scheme", "https"), (":authority", "www.example.com"),
        (":path", "/index.html?lang=en"),
        ("user-agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
        ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
        ("accept-language", "en-US,en;q=0.5"), ("accept-encoding", "gzip, deflate, br, zstd"),
        ("cookie", "session=4f2a"), ("cookie", "theme=dark"), ("priority", "u=0, i"),
        ("sec-fetch-mode", "navigate"),
    ]))
    write("request_head", "post-json-with-hop-headers", head(REPLACE | VIA, [
        (":method", "POST"), (":scheme", "https"), (":authority", "api.example.com:8443"),
        (":path", "/v1/items"), ("content-type", "application/json"), ("content-length", "27"),
        ("te", "trailers"), ("x-forwarded-for", "198.51.100.23"),
        ("forwarded", "for=198.51.100.23;proto=https"), ("x-forwarded-host", "api.example.com"),
        ("x-forwarded-proto", "http"), ("via", "1.1 edge"),
    ]))
    write("request_head", "grpc-call-ipv6", head(OFF | VIA | IPV6, [
        (":method", "POST"), (":scheme", "https"), (":authority", "grpc.example.com"),
        (":path", "/helloworld.Greeter/SayHello"), ("content-type", "application/grpc"),
        ("te", "trailers"), ("grpc-timeout", "1S"), ("user-agent", "grpc-go/1.64.0"),
    ]))
    write("request_head", "connect", head(APPEND, [
        (":method", "CONNECT"), (":authority", "proxy.example.com:443"),
    ]))
    write("request_head", "options-star", head(APPEND, [
        (":method", "OPTIONS"), (":scheme", "https"), (":authority", "example.com"), (":path", "*"),
    ]))
    write("request_head", "host-without-authority", head(APPEND | VIA, [
        (":method", "GET"), (":scheme", "http"), (":path", "/"), ("host", "Example.COM"),
    ]))
    write("request_head", "host-equals-authority", head(REPLACE, [
        (":method", "HEAD"), (":scheme", "https"), (":authority", "example.com"), (":path", "/"),
        ("host", "EXAMPLE.com"),
    ]))
    write("request_head", "host-differs", head(APPEND, [
        (":method", "GET"), (":scheme", "https"), (":authority", "a.example"), (":path", "/"),
        ("host", "b.example"),
    ]))
    write("request_head", "connection-header", head(APPEND, [
        (":method", "GET"), (":scheme", "https"), (":authority", "example.com"), (":path", "/"),
        ("connection", "keep-alive"),
    ]))
    write("request_head", "pseudo-after-regular", head(APPEND, [
        (":method", "GET"), ("accept", "*/*"), (":path", "/"),
    ]))
    # Known bugs (reported): each passes validate_request, then converts wrongly or not at all.
    base = [(":method", "GET"), (":scheme", "https")]
    write("request_head", "known-bug-authority-smuggles-path", head(APPEND, base + [
        (":authority", "public.example.com/admin?"), (":path", "/x"),
    ]))
    write("request_head", "known-bug-fragment-in-path", head(APPEND, base + [
        (":authority", "example.com"), (":path", "/a#b"),
    ]))
    write("request_head", "known-bug-authority-brace", head(APPEND, base + [
        (":authority", "a}b"), (":path", "/"),
    ]))
    write("request_head", "known-bug-bad-scheme", head(APPEND, [
        (":method", "GET"), (":scheme", "ht)ps"), (":authority", "example.com"), (":path", "/"),
    ]))
    write("request_head", "known-bug-control-in-value", head(APPEND, base + [
        (":authority", "example.com"), (":path", "/"), ("x-a", "a\x01b"),
    ]))
    write("request_head", "grpc-trailers", head(APPEND, [
        ("grpc-status", "0"), ("grpc-message", "OK"), ("x-checksum", "sha256=47DEQpj8"),
    ]))


# --- config ------------------------------------------------------------------------------

FULL = """\
version: 1
workers: 2
listen:
  protocol: http3
  address: "::1"
  port: 4433
  tls: {cert: certs/spooky.crt, key: certs/spooky.key}
quic:
  idle_timeout: 30s
  handshake_timeout: 1.5s
  max_concurrent_streams: 200
  initial_max_data: 16MiB
  initial_max_stream_data: 1048576
  max_connections: 100000
  retry: auto
  retry_threshold: 2000
  cid_len: 20
  server_id: "0x00a1b2c3d4e5f607"
  generation: 6
proxy:
  forwarded: replace
  via: false
  shutdown_grace: 0s
  max_header_list_size: 64KiB
upstream:
  api:
    route: {host: "*.api.example.com", path_prefix: /v1}
    load_balancing: {type: consistent-hash, key: "cookie:session", replicas: 160}
    timeouts: {connect: 500ms, response_head: 10s, idle: 30s}
    passive_health: {consecutive_failures: 3, cooldown: 10s}
    fail_open: true
    backends:
      - {id: api-1, address: "[2001:db8::10]:8080", weight: 10000}
      - id: api.2
        address: "192.0.2.11:8443"
        tls: {server_name: api.example.com, ca: certs/spooky.crt, verify: true}
        health_check:
          enabled: true
          path: /healthz
          interval: 2s
          timeout: 500ms
          healthy_threshold: 1
          unhealthy_threshold: 1000
          expected_status: [204, [200, 299], [500, 599]]
  static:
    route: {path_prefix: /static}
    load_balancing: {type: least-request}
    backends:
      - {id: static-1, address: "127.0.0.1:7001", health_check: {}}
log: {level: "spooky=debug,info", format: json}
"""

INVALID = """\
version: 2
listen:
  protocol: http2
  address: not-an-ip
  port: 0
  tls: {cert: certs/missing.crt, key: certs/spooky.crt}
quic:
  idle_timeout: 0s
  cid_len: 8
  server_id: "0x0102030405"
  generation: 7
  retry: off
  retry_threshold: 10
proxy: {forwarded: sometimes, max_header_list_size: 0}
upstream:
  "bad name!":
    route: {path_prefix: nope, host: "a.*.example"}
    load_balancing: {type: consistent-hash, key: "header:", replicas: 0}
    backends:
      - {id: dup, address: "192.0.2.1:0", weight: 0}
      - {id: dup, address: "api.example.com:http"}
  empty: {}
log: {format: xml}
workers: 0
"""

SHAPE_ERROR = """\
version: 1
listen:
  port: 443
  tls: {cert: certs/spooky.crt, key: certs/spooky.key}
  backlog: 128
upstream:
  web:
    backends:
      - {id: web-1, address: "127.0.0.1:80", weight: heavy}
"""


# --- endpoint ----------------------------------------------------------------------------

def endpoint_preamble(flags=0, workers=4, worker=2, dead=0, generation=0, max_conns=3, per_address=2,
                      hash_key=0x5EED1234):
    return bytes([flags, workers - 1, worker, dead, generation, max_conns, per_address]) + struct.pack("<I", hash_key)


RETRY_ALWAYS, RETRY_AUTO = 1 << 2, 2 << 2
FORWARDED, LATER, CLOSE_OLDEST, SECOND_ADDRESS, NEAR_FIRST = 1, 2, 4, 8, 16


def datagram(packet, size=1200, ctl=0):
    """One record: the header bytes given, padded (by the target) to `size` bytes."""
    return bytes([ctl]) + struct.pack("<H", max(0, size - len(packet))) + bytes([len(packet)]) + packet


def initial_header(dcid=CLIENT_DCID, version=1, token=b""):
    first = 0xC3 if version == 1 else 0xD3
    return long_header(first, version, dcid, CLIENT_SCID, bytes([len(token)]) + token + bytes.fromhex("449e") + bytes(4))


def client_dcid(n):
    return bytes([0x83, 0x94, 0xC8, 0xF0, n, 0x51, 0x57, 0x08])


def endpoint_seeds():
    p = endpoint_preamble()
    write("endpoint", "initials-up-to-the-limits", p + b"".join([
        datagram(initial_header(client_dcid(1))),
        datagram(initial_header(client_dcid(2))),
        datagram(initial_header(client_dcid(3))),  # third from one address: over per_address 2
        datagram(initial_header(client_dcid(4)), ctl=SECOND_ADDRESS),  # the share of 3 is full
        datagram(initial_header(client_dcid(5)), ctl=CLOSE_OLDEST | SECOND_ADDRESS),
        datagram(initial_header(client_dcid(6)), size=1199),  # too short for an Initial
        datagram(initial_header(client_dcid(7), version=0x6B3343CF), ctl=CLOSE_OLDEST | LATER),
    ]))
    write("endpoint", "retry-always", endpoint_preamble(flags=RETRY_ALWAYS) + b"".join([
        datagram(initial_header(client_dcid(1))),
        datagram(initial_header(client_dcid(2), token=bytes(range(40)))),  # a forged token
        datagram(initial_header(client_dcid(3)), ctl=SECOND_ADDRESS | LATER),
    ]))
    write("endpoint", "retry-auto-ipv6", endpoint_preamble(flags=RETRY_AUTO | 16, max_conns=50, per_address=50)
          + b"".join(datagram(initial_header(client_dcid(n)), ctl=LATER if n % 3 == 0 else 0) for n in range(6)))
    write("endpoint", "ipv6-one-64", endpoint_preamble(flags=16, per_address=2) + b"".join([
        datagram(initial_header(client_dcid(1))),
        datagram(initial_header(client_dcid(2)), ctl=NEAR_FIRST),
        datagram(initial_header(client_dcid(3)), ctl=NEAR_FIRST),  # the /64 holds 2 already
        datagram(initial_header(client_dcid(4)), ctl=SECOND_ADDRESS),
    ]))
    write("endpoint", "version-negotiation", p + b"".join([
        datagram(long_header(0xC0, 0x1A2A3A4A, CLIENT_DCID, CLIENT_SCID, bytes(8))),
        datagram(long_header(0xC0, 0x1A2A3A4A, CLIENT_DCID, CLIENT_SCID, bytes(8)), size=1199),
        datagram(long_header(0xC0, 0, CLIENT_DCID, CLIENT_SCID, bytes(8))),  # a VN packet itself
    ]))
    write("endpoint", "short-headers-every-worker", endpoint_preamble(dead=0b1000) + b"".join(
        [datagram(short_ours(w), size=60) for w in range(6)]
        + [datagram(short_ours(1), size=60, ctl=FORWARDED), datagram(short_ours(3), size=21)]))
    write("endpoint", "draining-takeover", endpoint_preamble(flags=2 | 32, generation=5) + b"".join([
        datagram(initial_header(client_dcid(1))),
        datagram(long_header(0xE2, 1, our_cid(1, generation=5), CLIENT_SCID, bytes(8)), size=300),
        datagram(short_ours(0, our_cid(0, generation=6)), size=60),
        datagram(initial_header(our_cid(2, generation=5))),
    ]))
    # Found by the target: a per-address limit of 0 let each address's first connection in.
    write("endpoint", "zero-per-address", endpoint_preamble(per_address=0) + datagram(initial_header()))
    write("endpoint", "kernel-placed-initials", endpoint_preamble(flags=1, workers=2, worker=1) + b"".join([
        datagram(initial_header(client_dcid(n)), ctl=n & FORWARDED) for n in range(4)]))


# --- response_head -----------------------------------------------------------------------

def response(status, fields):
    out = struct.pack("<H", status)
    for name, value in fields:
        name, value = name.encode(), value.encode()
        out += bytes([len(name)]) + name + bytes([len(value)]) + value
    return out


def response_head_seeds():
    write("response_head", "ok-html", response(200, [
        ("content-type", "text/html; charset=utf-8"), ("content-length", "1024"),
        ("cache-control", "max-age=60"), ("set-cookie", "a=1"), ("set-cookie", "b=2"),
        ("date", "Mon, 30 Nov 2026 08:00:00 GMT"), ("server", "nginx/1.26.0"),
    ]))
    write("response_head", "hop-by-hop-fields", response(502, [
        ("connection", "close"), ("keep-alive", "timeout=5"), ("proxy-connection", "keep-alive"),
        ("transfer-encoding", "chunked"), ("upgrade", "h2c"), ("x-kept", "yes"),
    ]))
    write("response_head", "grpc-trailers", response(200, [
        ("grpc-status", "0"), ("grpc-message", ""), ("content-type", "application/grpc"),
    ]))
    write("response_head", "informational-and-odd-status", response(103, [("link", "</s.css>; rel=preload")]))
    write("response_head", "status-999", response(999, [("X-Upper", "v"), ("empty", "")]))
    write("response_head", "status-out-of-range", response(1000, [("a", "b")]))
    # Found by the target: surrounding whitespace in a backend's value.
    write("response_head", "ows-value", response(200, [("set-cookie", " a=1\t"), ("x", "a \t b")]))


def config_seeds():
    for path in [ROOT / "config/config.yaml", *sorted((ROOT / "config/examples").glob("*.yaml"))]:
        name = "shipped-" + path.stem if path.parent.name == "config" else "example-" + path.stem
        shutil.copyfile(path, CORPUS / "config" / (name + ".yaml"))
    write("config", "full-every-section.yaml", FULL.encode())
    write("config", "many-rule-errors.yaml", INVALID.encode())
    write("config", "shape-errors.yaml", SHAPE_ERROR.encode())
    # Known bug (reported): a second document, even an empty one, gives an error with no line.
    minimal = (ROOT / "config/examples/minimal.yaml").read_text()
    write("config", "known-bug-two-documents.yaml", (minimal + "---\n").encode())
    # Found by the fuzz target: an earlier version's key at the top level had no field path.
    write("config", "earlier-top-level-backends.yaml", (minimal + "backends: []\n").encode())
    # Found by the target: a multi-line upstream name went into the field path as it was.
    write("config", "upstream-name-multiline.yaml", minimal.replace("upstream:\n", "upstream:\n  ? |\n    a\n    b\n  :\n    backends: [{id: x, address: \"127.0.0.1:1\"}]\n", 1).encode())


if __name__ == "__main__":
    TARGETS = ("cid", "request_head", "response_head", "endpoint", "config")
    for target in TARGETS:
        (CORPUS / target).mkdir(parents=True, exist_ok=True)
    cid_seeds()
    request_head_seeds()
    response_head_seeds()
    endpoint_seeds()
    config_seeds()
    for target in TARGETS:
        files = sorted((CORPUS / target).iterdir())
        print(f"{target}: {len(files)} seeds, {sum(f.stat().st_size for f in files)} bytes")

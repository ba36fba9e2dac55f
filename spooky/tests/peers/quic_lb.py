#!/usr/bin/env python3
"""An independent QUIC-LB connection-ID codec (draft-ietf-quic-load-balancers-21, "Server
ID Encoding in Connection IDs"), written from the draft with the `cryptography` package's
AES-128-ECB, to check Spooky's Rust codec against.

Reads JSON lines on stdin: {"rotation", "sid", "nonce", "key" (hex or null), "cid"} (hex)
and writes one JSON line each: {"cid": encode(sid, nonce), "sid", "nonce": decode(cid)}.
Every configuration encodes the CID length in the first octet. `decode` is also imported by
fleet_clients.py, to read the server ids of the connection IDs a fleet issued as a QUIC-LB
load balancer would.
"""
import json
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def aes_ecb(key, block, encrypt=True):
    c = Cipher(algorithms.AES(key), modes.ECB())
    op = c.encryptor() if encrypt else c.decryptor()
    return op.update(block) + op.finalize()


def expand(length, pass_no, half):
    return bytes(half) + bytes(14 - len(half)) + bytes([length, pass_no])


def rounds(key, plain, forward):
    n = len(plain)
    half = (n + 1) // 2
    odd = n % 2 == 1
    left = bytearray(plain[:half])
    right = bytearray(plain[n - half:])

    def clear_left(x):
        if odd:
            x[-1] &= 0xF0

    def clear_right(x):
        if odd:
            x[0] &= 0x0F

    clear_left(left)
    clear_right(right)

    def xor_into(dst, pass_no, src):
        out = aes_ecb(key, expand(n, pass_no, src))
        for i in range(half):
            dst[i] ^= out[i]

    order = [(1, "r"), (2, "l"), (3, "r"), (4, "l")]
    if not forward:
        order = list(reversed(order))
    for pass_no, target in order:
        if target == "r":
            xor_into(right, pass_no, left)
            clear_right(right)
        else:
            xor_into(left, pass_no, right)
            clear_left(left)
    if odd:
        return bytes(left[:-1]) + bytes([left[-1] | right[0]]) + bytes(right[1:])
    return bytes(left) + bytes(right)


def encode(rotation, sid, nonce, key):
    plain = sid + nonce
    first = bytes([(rotation << 5) | len(plain)])
    if key is None:
        return first + plain
    if len(plain) == 16:
        return first + aes_ecb(key, plain)
    return first + rounds(key, plain, True)


def decode(cid, sid_len, nonce_len, key):
    body = cid[1:1 + sid_len + nonce_len]
    if key is not None:
        body = aes_ecb(key, body, False) if len(body) == 16 else rounds(key, body, False)
    return body[:sid_len], body[sid_len:]


def main():
    for line in sys.stdin:
        q = json.loads(line)
        key = bytes.fromhex(q["key"]) if q["key"] else None
        sid, nonce = bytes.fromhex(q["sid"]), bytes.fromhex(q["nonce"])
        cid = bytes.fromhex(q["cid"])
        got_sid, got_nonce = decode(cid, len(sid), len(nonce), key)
        print(json.dumps({
            "cid": encode(q["rotation"], sid, nonce, key).hex(),
            "sid": got_sid.hex(),
            "nonce": got_nonce.hex(),
        }), flush=True)


if __name__ == "__main__":
    main()

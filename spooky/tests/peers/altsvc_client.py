"""libcurl (through curl_cffi) with an alt-svc cache, as a browser meets Spooky: the first
request goes over TCP (TLS, HTTP/2), the response's alt-svc names HTTP/3, and the next ones
go over HTTP/3 to the port it names.

Usage: altsvc_client.py --tcp-port P --udp-port Q --ca CA --requests N
Prints one JSON object: {"responses": [{"status", "http_version", "body"}...]} where
http_version is libcurl's CURLINFO_HTTP_VERSION (3: HTTP/2, 30: HTTP/3).
"""

import argparse
import json
import os
import tempfile
from io import BytesIO

from curl_cffi import Curl, CurlInfo, CurlOpt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tcp-port", type=int, required=True)
    ap.add_argument("--udp-port", type=int, required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--requests", type=int, default=3)
    args = ap.parse_args()
    cache = os.path.join(tempfile.mkdtemp(prefix="spooky-altsvc-"), "altsvc.txt")
    out = []
    for _ in range(args.requests):
        c = Curl()
        body = BytesIO()
        c.setopt(CurlOpt.URL, f"https://localhost:{args.tcp_port}/hello")
        # Both ports on the address Spooky listens on (not ::1 first).
        c.setopt(
            CurlOpt.RESOLVE,
            [f"localhost:{args.tcp_port}:127.0.0.1", f"localhost:{args.udp_port}:127.0.0.1"],
        )
        c.setopt(CurlOpt.CAINFO, args.ca)
        c.setopt(CurlOpt.ALTSVC, cache)
        c.setopt(CurlOpt.WRITEDATA, body)
        c.setopt(CurlOpt.TIMEOUT_MS, 10000)
        c.perform()
        out.append(
            {
                "status": c.getinfo(CurlInfo.RESPONSE_CODE),
                "http_version": c.getinfo(CurlInfo.HTTP_VERSION),
                "body": body.getvalue().decode("utf-8", "replace"),
            }
        )
        c.close()
    print(json.dumps({"responses": out}))


if __name__ == "__main__":
    main()

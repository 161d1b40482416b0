#!/usr/bin/env python3
"""A webhook receiver for scripts: verifies builder-vm's signature and records each report.

Usage: webhook-receiver.py --port PORT --secret-file FILE --out DIR
Every POST whose `x-builder-signature` verifies (HMAC-SHA256 over "<timestamp>.<body>", the
timestamp within 300 s) is written to DIR/<build_id>.json and answered 204; anything else gets
401 and is logged. An independent implementation of the scheme in builder-contract's
signature module, so scripts check the agent against it rather than against itself.
"""
import argparse
import hashlib
import hmac
import http.server
import socketserver
import json
import os
import sys
import time

TOLERANCE_SECS = 300


def make_handler(secret: bytes, out: str):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            timestamp = self.headers.get("x-builder-timestamp", "")
            signature = self.headers.get("x-builder-signature", "")
            expected = "v1=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
            fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) <= TOLERANCE_SECS
            if not (fresh and hmac.compare_digest(expected, signature)):
                sys.stderr.write("webhook-receiver: rejected a request with a bad or stale signature\n")
                self.send_response(401)
                self.end_headers()
                return
            report = json.loads(body)
            name = "".join(c for c in report.get("build_id", "unknown") if c.isalnum() or c in "-_.")
            with open(os.path.join(out, name + ".json.tmp"), "wb") as f:
                f.write(body)
            os.replace(os.path.join(out, name + ".json.tmp"), os.path.join(out, name + ".json"))
            sys.stderr.write(f"webhook-receiver: {name}: {report.get('status')}\n")
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    return Handler


class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        # Not HTTPServer.server_bind: its socket.getfqdn() asks DNS for the address's name,
        # which in a test namespace without a resolver waits 10 s before the receiver listens.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--secret-file", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.secret_file, "rb") as f:
        secret = f.read().strip()
    os.makedirs(args.out, exist_ok=True)
    server = Server((args.bind, args.port), make_handler(secret, args.out))
    server.serve_forever()


if __name__ == "__main__":
    main()

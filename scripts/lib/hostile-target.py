#!/usr/bin/env python3
"""A target of the hostile-build suite (scripts/lib/hostile.sh): an HTTP server on one or more
NAME=ADDR:PORT listeners that answers every request with 200 and its listener's name, and
appends one JSON line per request to --log: {"at_ms", "listener", "client", "method", "path"}.
The suite's own readiness probes use the path /bvt-probe; every other line is a request that
reached the target, which for these targets means a builder VM got through.

  hostile-target.py --log FILE [--release-dir DIR] NAME=ADDR:PORT [NAME=ADDR:PORT ...]

With --release-dir it is the suite's control server instead: GET /release/NAME answers 200 once
DIR/NAME exists and 404 before; every other path 404; every request is logged the same way.
"""
import argparse
import os
import http.server
import json
import socket
import socketserver
import sys
import threading
import time

lock = threading.Lock()


def handler_for(name, log, release_dir):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def record(self):
            line = json.dumps({
                "at_ms": int(time.time() * 1000),
                "listener": name,
                "client": self.client_address[0],
                "method": self.command,
                "path": self.path,
            })
            with lock, open(log, "a", encoding="utf-8") as f:
                f.write(line + "\n")
            body = f"target {name}\n".encode()
            status = 200
            if release_dir is not None:
                wanted = self.path.split("?")[0]
                released = wanted.startswith("/release/") and "/" not in wanted[9:] and \
                    os.path.exists(os.path.join(release_dir, wanted[9:]))
                status, body = (200, b"released\n") if released else (404, b"not yet\n")
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = record

        def log_message(self, *args):
            pass

    return Handler


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):
        # Bind before the address exists (a dummy link or namespace address set up just after).
        self.socket.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND
        # Not HTTPServer.server_bind: its socket.getfqdn() asks DNS for the address's name,
        # which in a namespace without a resolver waits 10 s (and sends queries).
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    parser.add_argument("--release-dir")
    parser.add_argument("listeners", nargs="+")
    args = parser.parse_args()
    open(args.log, "a").close()
    servers = []
    for spec in args.listeners:
        name, _, where = spec.partition("=")
        addr, _, port = where.rpartition(":")
        server = Server((addr, int(port)), handler_for(name, args.log, args.release_dir))
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"hostile-target: serving {' '.join(args.listeners)}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

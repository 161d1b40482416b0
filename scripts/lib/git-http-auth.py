#!/usr/bin/env python3
"""A private git server for the tests: git's smart HTTP (`git http-backend` run as a CGI) for
every repository under ROOT, behind HTTP Basic authentication with one token.

Any user name is accepted; the password must be the token (what a git host's access token looks
like to git: `https://USER:TOKEN@host/repo.git`, or `http.extraHeader=Authorization: Basic
base64(USER:TOKEN)`). Without valid credentials every request gets 401 with
`WWW-Authenticate: Basic`, so git asks for credentials and fails when it has none.

Standard library only. The token comes from the environment (BUILDER_GIT_HTTP_TOKEN), not the
command line, which every user can read in /proc. Requests are logged without their headers.

Usage: BUILDER_GIT_HTTP_TOKEN=... git-http-auth.py --listen 127.0.0.1 --port PORT --root DIR
Started and stopped by scripts/lib/services.sh (bt_start_git_http).
"""

import argparse
import base64
import binascii
import hmac
import http.server
import os
import subprocess
import sys
import urllib.parse

REALM = "builder-test private git"


def git_exec_path():
    out = subprocess.run(["git", "--exec-path"], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def log_stderr(data):
    """git http-backend's messages, one per line (it ends some without a newline)."""
    text = data.decode(errors="replace")
    if text:
        sys.stderr.write(text if text.endswith("\n") else text + "\n")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "builder-test-git-http/1"

    def authorized(self):
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        _user, sep, password = decoded.partition(":")
        return bool(sep) and hmac.compare_digest(password.encode(), self.server.token.encode())

    def send_plain(self, status, text, extra_headers=()):
        body = text.encode()
        self.send_response(status)
        for name, value in extra_headers:
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def handle_git(self):
        body = self.read_body() if self.command == "POST" else b""
        if not self.authorized():
            self.send_plain(401, "authentication required\n",
                            [("WWW-Authenticate", f'Basic realm="{REALM}"')])
            return
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        if "/../" in path + "/" or "\0" in path:
            self.send_plain(400, "bad path\n")
            return
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": self.server.root,
            "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": url.query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": self.client_address[0],
            "REMOTE_USER": "builder-test",
            # Lets pushes through (http.receivepack), as an authenticated git host would.
            "GIT_HTTP_RECEIVE_PACK": "1",
            "HOME": self.server.root,
        }
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        proc = subprocess.run([os.path.join(self.server.exec_path, "git-http-backend")],
                              input=body, env=env, capture_output=True)
        head, sep, payload = proc.stdout.partition(b"\r\n\r\n")
        if not sep:
            head, sep, payload = proc.stdout.partition(b"\n\n")
        log_stderr(proc.stderr)
        if proc.returncode != 0 and not sep:
            self.send_plain(500, "git http-backend failed\n")
            return
        status, headers = 200, []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers.append((name.strip(), value.strip()))
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in ("content-length", "transfer-encoding"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = handle_git
    do_POST = handle_git
    do_HEAD = handle_git

    def log_request(self, code="-", size="-"):
        # The request line and status only: never the Authorization header.
        self.log_message('"%s %s" %s', self.command, self.path, code)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", required=True, help="directory holding the bare repositories")
    args = parser.parse_args()
    token = os.environ.get("BUILDER_GIT_HTTP_TOKEN", "")
    if not token:
        sys.exit("git-http-auth: BUILDER_GIT_HTTP_TOKEN is not set")
    server = http.server.ThreadingHTTPServer((args.listen, args.port), Handler)
    server.daemon_threads = True
    server.token = token
    server.root = os.path.realpath(args.root)
    server.exec_path = git_exec_path()
    print(f"git-http-auth: serving {server.root} on http://{args.listen}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

"""A local app for the filter tests: HTTP/1.1 with keep-alive, answers `<name>:<method> <path>`
(name: the first argument, default `local`)."""
import http.server
import sys

NAME = sys.argv[1] if len(sys.argv) > 1 else "local"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = f"{NAME}:{self.command} {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = answer

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("0.0.0.0", 80), Handler).serve_forever()

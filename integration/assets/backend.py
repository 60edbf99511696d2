"""A staging backend for the tests: HTTP on :80 and a UDP echo on :9000.

It runs on an internal Docker network, so only containers on that network (the target) reach it.
"""
import http.server
import socket
import threading


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from backend, you asked for {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def udp_echo():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 9000))
    while True:
        data, addr = sock.recvfrom(2048)
        sock.sendto(b"echo:" + data, addr)


threading.Thread(target=udp_echo, daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", 80), Handler).serve_forever()

"""Sends requests over ONE kept-alive connection and prints [status, body] for each, as JSON."""
import http.client
import json
import sys

conn = http.client.HTTPConnection(sys.argv[1], 80, timeout=10)
out = []
for method, path, headers in json.loads(sys.argv[2]):
    conn.request(method, path, body=b"x" if method == "POST" else None, headers=headers)
    response = conn.getresponse()
    out.append([response.status, response.read().decode().strip()])
print(json.dumps({"responses": out, "connections": 1 if conn.sock else 0}))

"""A stand-in for the exalsius API on 127.0.0.1, for the package test in a booted container.

PATCH /v1/node/<id> answers with a rotated token. Rotation as a careful API does it: using a
token retires every token issued before it; tokens issued after it stay valid (so an agent
killed between issue and persist still works). Every request is appended to a JSON-lines log:
{"t": epoch seconds, "node": id, "auth": header, "status": code, "body": parsed JSON or null}.

Usage: python3 standin_api.py PORT LOGFILE NODE_ID BOOTSTRAP_TOKEN
"""
import http.server
import json
import socketserver
import sys
import threading
import time

port, log_path, node_id, boot = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
lock = threading.Lock()
issued = []  # tokens in issue order
accepted = {boot}


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_PATCH(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        node = self.path.rstrip("/").rsplit("/", 1)[-1]
        with lock:
            if node != node_id:
                status, answer = 404, {"detail": {"type": "x", "title": "Not Found", "status": 404,
                                                  "detail": "no such node", "instance": self.path}}
            elif token not in accepted:
                status, answer = 401, {"detail": {"type": "x", "title": "Unauthorized", "status": 401,
                                                  "detail": "token rejected", "instance": self.path}}
            else:
                new = "standin-SECRET-%05d" % (len(issued) + 1)
                if token in issued:
                    used_at = issued.index(token)
                    for old in issued[:used_at]:
                        accepted.discard(old)
                    accepted.discard(boot)
                issued.append(new)
                accepted.add(new)
                status, answer = 200, {"node_id": node, "next_access_token": new,
                                       "next_access_token_expires_in": 3600,
                                       "next_access_token_type": "Bearer"}
            with open(log_path, "a") as log:
                log.write(json.dumps({"t": time.time(), "node": node, "auth": auth,
                                      "status": status, "body": body}) + "\n")
        out = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if status == 200 else "application/problem+json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


Server(("127.0.0.1", port), Handler).serve_forever()

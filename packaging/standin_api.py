"""A stand-in for the exalsius API on 127.0.0.1, for the package test in a booted container.

PATCH /v1/node/<id> answers with a rotated token. Rotation as a careful API does it: using a
token retires every token issued before it; tokens issued after it stay valid (so an agent
killed between issue and persist still works). Every request is appended to a JSON-lines log:
{"t": epoch seconds, "node": id, "auth": header, "status": code, "body": parsed JSON or null}.

FLEET_NODE (bootstrap FLEET_TOKEN) is a node of its own for the repository's upgrade and
rollback test, which begins after the other nodes' tokens have rotated. A PATCH answered 200
logs the token it issued under "issued".

LEGACY_NODE is a node client-hw-info registered long ago: its bootstrap is retired, and only
LEGACY_TOKEN (the latest token the old tool rotated to) is accepted for it.

POST /v1/node/self-register with REGISTER_TOKEN registers REGISTERED_NODE and issues its
first token; that node's tokens rotate the same way, independently of NODE_ID's.

Usage: python3 standin_api.py PORT LOGFILE NODE_ID BOOTSTRAP_TOKEN REGISTER_TOKEN
"""
import http.server
import json
import socketserver
import sys
import threading
import time

port, log_path, node_id, boot, register_token = (
    int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
REGISTERED_NODE = "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d"
LEGACY_NODE = "9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a"
LEGACY_TOKEN = "legacy-SECRET-token-9"
FLEET_NODE = "7c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f"
FLEET_TOKEN = "fleet-SECRET-token-5"
lock = threading.Lock()
# Per node: tokens in issue order, the tokens accepted now, and its bootstrap token.
nodes = {node_id: {"issued": [], "accepted": {boot}, "boot": boot},
         LEGACY_NODE: {"issued": [LEGACY_TOKEN], "accepted": {LEGACY_TOKEN}, "boot": None},
         FLEET_NODE: {"issued": [], "accepted": {FLEET_TOKEN}, "boot": FLEET_TOKEN}}
counter = [0]


def issue(node):
    counter[0] += 1
    new = "standin-SECRET-%05d" % counter[0]
    node["issued"].append(new)
    node["accepted"].add(new)
    return new


def log(entry):
    with open(log_path, "a") as f:
        f.write(json.dumps(dict(entry, t=time.time())) + "\n")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, answer):
        out = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if status < 300 else "application/problem+json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except ValueError:
            body = None
        with lock:
            if not self.path.endswith("/node/self-register") or not isinstance(body, dict):
                status, answer = 404, {"detail": {"type": "x", "title": "Not Found", "status": 404,
                                                  "detail": "no such route", "instance": self.path}}
            elif body.get("register_token") != register_token:
                status, answer = 401, {"detail": {"type": "x", "title": "Unauthorized", "status": 401,
                                                  "detail": "register token rejected", "instance": self.path}}
            elif REGISTERED_NODE in nodes:
                status, answer = 409, {"detail": {"type": "x", "title": "Conflict", "status": 409,
                                                  "detail": "node exists", "instance": self.path}}
            else:
                nodes[REGISTERED_NODE] = {"issued": [], "accepted": set(), "boot": None}
                status, answer = 201, {"node_id": REGISTERED_NODE,
                                       "next_access_token": issue(nodes[REGISTERED_NODE]),
                                       "next_access_token_expires_in": 3600,
                                       "next_access_token_type": "Bearer"}
            log({"method": "POST", "node": None, "auth": self.headers.get("Authorization", ""),
                 "status": status, "body": None})
        self.answer(status, answer)

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
        issued = None
        with lock:
            entry = nodes.get(node)
            if entry is None:
                status, answer = 404, {"detail": {"type": "x", "title": "Not Found", "status": 404,
                                                  "detail": "no such node", "instance": self.path}}
            elif token not in entry["accepted"]:
                status, answer = 401, {"detail": {"type": "x", "title": "Unauthorized", "status": 401,
                                                  "detail": "token rejected", "instance": self.path}}
            else:
                if token in entry["issued"]:
                    used_at = entry["issued"].index(token)
                    for old in entry["issued"][:used_at]:
                        entry["accepted"].discard(old)
                    entry["accepted"].discard(entry["boot"])
                issued = issue(entry)
                status, answer = 200, {"node_id": node, "next_access_token": issued,
                                       "next_access_token_expires_in": 3600,
                                       "next_access_token_type": "Bearer"}
            log({"method": "PATCH", "node": node, "auth": auth, "status": status, "body": body,
                 "issued": issued})
        self.answer(status, answer)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


Server(("127.0.0.1", port), Handler).serve_forever()

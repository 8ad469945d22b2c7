#!/usr/bin/env python3
"""Regenerates packaging/hot-text.txt, the functions `run` executes (issue 22):
    python3 bench/hot-text.py            (needs valgrind; perf for the last step)

Why: the kernel maps the binary's code in 64 KiB windows around each page it executes
(fault-around), and a run touches functions spread over the whole of .text, so nearly all of it
ends up resident. build.rs turns this list into a linker script that puts these functions next
to each other in a section `.text.hot` before `.text`; what `run` never executes then stays
unmapped. A function missing from the list (new code, a renamed function) only costs memory.

How: builds the release binary with symbols (target/hot-text), runs it under callgrind in four
situations against a loopback API, and keeps every function of the binary that ran:
  plain    http, no GPU library, log level warn: what bench/footprint.py measures;
  field    https with a private CA, the stub NVML with eight GPUs, systemd notifications and the
           watchdog, log level info, a metrics textfile;
  trouble  503s, a 429 with Retry-After, a 401 for the stored token, a reload (SIGHUP), JSON logs.
The groups are written in that order, so the plain run touches one contiguous block. Valgrind's
CPU lacks instructions the real one has (SHA-NI, AVX-512), and the libraries pick other code for
them at run time: the last step links the binary with the list, runs the plain situation natively
under `perf record -e page-faults` and adds every function whose code faulted outside
`.text.hot`, until none does (a fault maps its whole 64 KiB window, hiding its neighbours, so
this takes rounds; at most eight).

Names are stored with the 16-digit hash of legacy-mangled symbols replaced by `*` (it changes
with the build's target and flags) and without LLVM's `.N` suffix of local copies (numbered
differently in every build); v0-mangled names (the standard library's) are otherwise whole.
"""
import http.server
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

from footprint import sections  # bench/footprint.py: name -> (address, size) of loaded sections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(ROOT, "target/hot-text")
BIN = os.path.join(TARGET, "release/exalsius-node-agent")
LIST = os.path.join(ROOT, "packaging/hot-text.txt")
NODE = "0a0a0a0a-0000-4000-8000-000000000001"


class Api(http.server.BaseHTTPRequestHandler):
    """PATCH /node/{id}: a new token per 200; `plan` holds answers to give first."""
    protocol_version = "HTTP/1.1"
    count = 0
    plan = []

    def do_PATCH(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        Api.count += 1
        status = Api.plan.pop(0) if Api.plan else 200
        if status == 200:
            body = ('{"node_id":"%s","next_access_token":"tok-%d","next_access_token_expires_in":'
                    '3600,"next_access_token_type":"Bearer"}' % (self.path.rsplit("/", 1)[1], Api.count))
            ctype = "application/json"
        else:
            body = '{"type":"about:blank","title":"stand-in","status":%d,"detail":"planned"}' % status
            ctype = "application/problem+json"
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        if status == 429:
            self.send_header("retry-after", "1")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def serve(tls_dir=None):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    scheme = "http"
    if tls_dir:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(os.path.join(tls_dir, "cert.pem"), os.path.join(tls_dir, "key.pem"))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"{scheme}://127.0.0.1:{server.server_address[1]}/v1"


def config(work, name, url, extra=""):
    path = os.path.join(work, f"{name}.toml")
    with open(path, "w") as f:
        f.write(f'[api]\nurl = "{url}"\nnode_id = "{NODE}"\naccess_token = "boot"\n'
                f'{extra}\n[heartbeat]\ninterval = "300ms"\njitter = 0.1\ninitial_backoff = "200ms"\n'
                f'[state]\ndir = "{work}/state-{name}"\n')
    return path


def situation(work, name, cmd_prefix, steps):
    """Runs the agent (under cmd_prefix) through steps: ("wait", s), ("plan", [...]), ("hup",));
    exits if no heartbeat of it was answered (a profile of failures only would be wrong)."""
    before = Api.count
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    cfg, extra_env = steps[0]
    env.update(extra_env)
    p = subprocess.Popen(cmd_prefix + [BIN, "--config", cfg, "run"], env=env,
                         stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, f"{name}.log"), "w"))
    for step in steps[1:]:
        if step[0] == "wait":
            time.sleep(step[1])
        elif step[0] == "plan":
            Api.plan[:] = step[1]
        elif step[0] == "hup":
            os.kill(p.pid, signal.SIGHUP)
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    if Api.count == before:
        sys.exit(f"hot-text: the {name} run reached no API (see {work}/{name}.log)")


def situations(work):
    """(name, steps) for each situation; configs written into work."""
    # A private CA (RSA, as many public chains are) and a server certificate (ECDSA P-256) it
    # signed: the handshake verifies both kinds of signature. A self-signed server certificate
    # is refused by webpki (CaUsedAsEndEntity), and the field run would profile only failures.
    w = lambda name: os.path.join(work, name)
    with open(w("leaf.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    for cmd in (["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=hot-text CA",
                 "-keyout", w("ca.key"), "-out", w("ca.pem")],
                ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj",
                 "/CN=127.0.0.1", "-keyout", w("key.pem"), "-out", w("leaf.csr")],
                ["x509", "-req", "-in", w("leaf.csr"), "-CA", w("ca.pem"), "-CAkey", w("ca.key"),
                 "-CAcreateserial", "-days", "2", "-extfile", w("leaf.ext"), "-out", w("cert.pem")]):
        subprocess.run(["openssl"] + cmd, check=True, capture_output=True)
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", os.path.join(work, "libnvidia-ml.so.1"),
                    os.path.join(ROOT, "tests/support/fake_nvml.c")], check=True)
    with open(os.path.join(work, "fake_nvml.conf"), "w") as f:
        f.write("count=8\nname=NVIDIA H100 80GB HBM3\nmem_mib=81559\ndriver=550.54.15\n")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(os.path.join(work, "notify"))
    threading.Thread(target=lambda: [notify.recv(4096) for _ in iter(int, 1)], daemon=True).start()
    http_url, https_url = serve(), serve(work)
    plain = config(work, "plain", http_url, '[inventory]\ngpu = "auto"\n[log]\nlevel = "warn"')
    field = config(work, "field", https_url,
                   f'ca_file = "{work}/ca.pem"\n[inventory]\ngpu = "auto"\n'
                   f'nvml_library = "{work}/libnvidia-ml.so.1"\nrefresh_interval = "2s"\n'
                   f'[log]\nlevel = "info"\n[metrics]\ntextfile = "{work}/agent.prom"')
    trouble = config(work, "trouble", http_url, '[log]\nlevel = "info"\nformat = "json"')
    systemd = {"NOTIFY_SOCKET": os.path.join(work, "notify"), "WATCHDOG_USEC": "2000000"}
    return [
        # with the footprint marks bench/footprint.py asks for: their few functions are hot too
        ("plain", [(plain, {"EXALSIUS_FOOTPRINT_MARKS": os.path.join(work, "marks")}), ("wait", 15)]),
        ("field", [(field, systemd), ("wait", 15)]),
        ("trouble", [(trouble, {}), ("wait", 8), ("plan", [503, 503, 503, 429, 200]), ("wait", 10),
                     ("plan", [401]), ("wait", 5), ("hup",), ("wait", 5)]),
    ]


def symbols(path):
    """name -> address of each function defined in path."""
    out = subprocess.run(["nm", "--defined-only", path], capture_output=True, text=True, check=True)
    return {p[2]: int(p[0], 16) for p in (l.split() for l in out.stdout.splitlines())
            if len(p) == 3 and p[1] in "tTwW"}


def pattern(name):
    """The name as the list keeps it: build.rs matches NAME and NAME.* (LLVM numbers the copies
    of a local function, `write_str.288`, differently in every build)."""
    m = re.match(r"(_ZN.*17h)[0-9a-f]{16}E", name)
    return m.group(1) + "*" if m else re.sub(r"\.\d+$", "", name)


def libm_names():
    """What libm exports: compiler-builtins defines some of them (round, trunc) weakly, and naming
    those in the script made rust-lld keep libm.so.6 as NEEDED (308 KiB more resident)."""
    libm = subprocess.run(["cc", "-print-file-name=libm.so.6"], capture_output=True, text=True).stdout.strip()
    out = subprocess.run(["nm", "-D", "--defined-only", libm], capture_output=True, text=True).stdout
    return {l.split()[-1].split("@")[0] for l in out.splitlines() if l.split()}


def ran(callgrind_out):
    names = set()
    with open(callgrind_out, errors="replace") as f:
        for line in f:
            if line.startswith(("fn=", "cfn=")):
                names.add(line.split("=", 1)[1].strip())
    return names


def build(extra_env=None):
    env = dict(os.environ, CARGO_PROFILE_RELEASE_STRIP="none", CARGO_TARGET_DIR=TARGET, **(extra_env or {}))
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "exalsius-node-agent"],
                   cwd=ROOT, env=env, check=True)


def write(groups, note):
    seen, lines = set(), []
    for name, pats in groups:
        fresh = sorted(p for p in pats if p not in seen)
        seen.update(fresh)
        lines += [f"# group: {name} ({len(fresh)})"] + fresh
    with open(LIST, "w") as f:
        f.write("# Functions `run` executes, hottest group first: build.rs puts them into .text.hot.\n"
                "# Generated by `python3 bench/hot-text.py` (read it for how); regenerate after\n"
                "# changes to the heartbeat path. One symbol per line, `*` for a legacy hash.\n"
                f"# {note}\n" + "\n".join(lines) + "\n")


def native_faults(work):
    """Functions of the linked binary whose code faulted outside .text.hot in a native plain run."""
    data = os.path.join(work, "faults.data")
    cfg = os.path.join(work, "plain.toml")
    env = dict(os.environ, EXALSIUS_FOOTPRINT_MARKS=os.path.join(work, "marks"))
    env.pop("NOTIFY_SOCKET", None)
    p = subprocess.Popen(["perf", "record", "-q", "-e", "page-faults", "-c", "1", "-d", "-o", data,
                          BIN, "--config", cfg, "run"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(5)
    p.send_signal(signal.SIGINT)
    p.wait()
    lo, size = sections(BIN)[".text"]
    syms = sorted((a, n) for n, a in symbols(BIN).items())
    script = subprocess.run(["perf", "script", "-i", data, "--show-mmap-events", "-F", "addr"],
                            capture_output=True, text=True).stdout
    base, found = None, set()
    for line in script.splitlines():
        if "PERF_RECORD_MMAP" in line and BIN in line and base is None:
            # the first mapping (file offset 0, address 0 of the PIE): the load address
            base = int(re.search(r"\[0x([0-9a-f]+)\(", line).group(1), 16)
            continue
        if base is None or "PERF_RECORD" in line:
            continue
        try:
            va = int(line.split()[0], 16) - base
        except (ValueError, IndexError):
            continue
        if lo <= va < lo + size:
            before = [n for a, n in syms if a <= va]
            if before and before[-1] != "_start":
                found.add(before[-1])
    return found


def main():
    work = tempfile.mkdtemp(prefix="hot-text-")
    build()
    plan = situations(work)
    groups = []
    skip = libm_names()
    for name, steps in plan:
        out = os.path.join(work, f"{name}.callgrind")
        prefix = ["valgrind", "--tool=callgrind", "--demangle=no", "--compress-strings=no",
                  f"--callgrind-out-file={out}"]
        situation(work, name, prefix, steps)
        groups.append((name, {pattern(n) for n in ran(out) & symbols(BIN).keys() if n not in skip}))
        print(f"hot-text: {name}: {len(groups[-1][1])} functions ran", file=sys.stderr)
    native = set()
    for round_ in range(8):  # one fault per 64 KiB window: each round may show more
        write([(groups[0][0], groups[0][1] | native)] + groups[1:], "perf rounds pending")
        build()
        faults = {n for n in native_faults(work) if n not in skip}
        print(f"hot-text: native round {round_ + 1}: {len(faults)} functions faulted outside "
              f".text.hot: {' '.join(sorted(faults))}", file=sys.stderr)
        if not faults:
            break
        native |= {pattern(n) for n in faults}
    else:
        sys.exit("hot-text: functions still fault outside .text.hot after 8 rounds")
    size = sections(BIN).get(".text.hot", (0, 0))[1]
    write([(groups[0][0], groups[0][1] | native)] + groups[1:],
          f"x86-64 release build: .text.hot {size} bytes")
    print(f"hot-text: wrote {LIST}: .text.hot {size} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()

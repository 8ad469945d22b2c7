#!/usr/bin/env python3
"""What the resident memory of `run` is made of (issue 22): python3 bench/footprint.py [RUNS]

Builds the release agent and the floor (examples/floor.rs), serves PATCH /node/{id} on
loopback, and runs each RUNS times (default 5) for ~150 heartbeats at 50 ms:

- the agent with EXALSIUS_FOOTPRINT_MARKS (src/footprint.rs): resident memory after each phase
  of start-up and after the 1st/10th/100th heartbeat — the growth between two marks is what
  that phase cost (the first phase to touch shared code, std's formatting say, pays for it);
- agent and floor: resident memory by mapping (the binary, libc, heap, the rest) from
  /proc/PID/smaps;
- the binary's sections (`size -A`) and, when cargo-bloat is installed, .text by crate.

Writes bench/results/footprint.md (medians) and prints it.
"""
import http.server
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
NODE = "0a0a0a0a-0000-4000-8000-000000000001"


class Api(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    count = 0

    def do_PATCH(self):
        n = int(self.headers.get("content-length") or 0)
        self.rfile.read(n)
        Api.count += 1
        node = self.path.rsplit("/", 1)[1]
        body = json.dumps({"node_id": node, "next_access_token": f"tok-{Api.count}",
                           "next_access_token_expires_in": 3600,
                           "next_access_token_type": "Bearer"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def by_mapping(pid, exe):
    out = {"binary": 0, "libc": 0, "heap": 0, "rest": 0}
    name = ""
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                name = head[5] if len(head) > 5 else ""
            elif head[0] == "Rss:":
                kib = int(head[1])
                if name == exe:
                    out["binary"] += kib
                elif "libc.so" in name:
                    out["libc"] += kib
                elif name == "[heap]":
                    out["heap"] += kib
                else:
                    out["rest"] += kib
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "RssAnon:", "RssFile:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def run_agent(url, work):
    cfg = os.path.join(work, "agent.toml")
    marks = os.path.join(work, "marks")
    state = os.path.join(work, "state")
    shutil.rmtree(state, ignore_errors=True)
    if os.path.exists(marks):
        os.remove(marks)
    with open(cfg, "w") as f:
        f.write(f'[api]\nurl = "{url}"\nnode_id = "{NODE}"\naccess_token = "boot"\n'
                f'[heartbeat]\ninterval = "50ms"\njitter = 0.0\n[inventory]\ngpu = "auto"\n'
                f'[state]\ndir = "{state}"\n[log]\nlevel = "warn"\n')
    exe = os.path.join(ROOT, "target/release/exalsius-node-agent")
    env = dict(os.environ, EXALSIUS_FOOTPRINT_MARKS=marks)
    env.pop("NOTIFY_SOCKET", None)
    p = subprocess.Popen([exe, "--config", cfg, "run"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        if os.path.exists(marks) and "heartbeat 100" in open(marks).read():
            break
        time.sleep(0.05)
    time.sleep(1)
    maps = by_mapping(p.pid, os.path.realpath(exe))
    p.kill()
    p.wait()
    phases = []
    for line in open(marks):
        name, rss, anon, file, hwm = line.rstrip("\n").split("\t")
        phases.append((name, int(rss), int(anon), int(file)))
    return phases, maps


def run_floor(url):
    exe = os.path.join(ROOT, "target/release/examples/floor")
    p = subprocess.Popen([exe, f"{url}/node/{NODE}", "50"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(8.5)
    maps = by_mapping(p.pid, os.path.realpath(exe))
    p.kill()
    p.wait()
    return maps


def main():
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "exalsius-node-agent",
                    "--example", "floor"], cwd=ROOT, check=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    work = tempfile.mkdtemp()
    agent_runs, floor_runs = [], []
    for _ in range(RUNS):  # side by side: agent, floor, agent, floor, …
        agent_runs.append(run_agent(url, work))
        floor_runs.append(run_floor(url))
    shutil.rmtree(work, ignore_errors=True)

    med = lambda xs: int(statistics.median(xs))
    lines = [f"# Footprint of `run`: where the resident memory goes",
             "",
             f"`python3 bench/footprint.py` — {RUNS} runs each, agent and floor alternating, "
             "medians in KiB; ~150 heartbeats at 50 ms against a loopback API, `gpu = \"auto\"` "
             "(no NVIDIA driver on the machine that ran it).",
             "",
             "## The agent's start-up, phase by phase (src/footprint.rs marks)",
             "",
             "| after | RSS | growth | of which anonymous | of which file-backed |",
             "|---|---|---|---|---|"]
    names = [p[0] for p in agent_runs[0][0]]
    prev = 0
    for i, name in enumerate(names):
        rss = med([r[0][i][1] for r in agent_runs if len(r[0]) > i])
        anon = med([r[0][i][2] for r in agent_runs if len(r[0]) > i])
        file = med([r[0][i][3] for r in agent_runs if len(r[0]) > i])
        growth = "" if i == 0 else f"{rss - prev:+d}"
        lines.append(f"| {name} | {rss} | {growth} | {anon} | {file} |")
        prev = rss
    lines += ["", "## By mapping, after ~150 heartbeats", "",
              "| mapping | agent | floor | difference |", "|---|---|---|---|"]
    for key in ["binary", "libc", "heap", "rest", "RssAnon", "RssFile", "VmHWM"]:
        a = med([r[1][key] for r in agent_runs])
        f = med([r[key] for r in floor_runs])
        lines.append(f"| {key} | {a} | {f} | {a - f:+d} |")
    a = med([r[1]["VmHWM"] for r in agent_runs])
    f = med([r["VmHWM"] for r in floor_runs])
    lines += ["", f"Peak RSS ratio (medians): **{a / f:.2f}×** the floor.", ""]

    size = subprocess.run(["size", "-A", os.path.join(ROOT, "target/release/exalsius-node-agent")],
                          capture_output=True, text=True).stdout
    fsize = subprocess.run(["size", "-A", os.path.join(ROOT, "target/release/examples/floor")],
                           capture_output=True, text=True).stdout
    sec = lambda text: {l.split()[0]: int(l.split()[1]) for l in text.splitlines()
                        if l.startswith(".") and len(l.split()) == 3}
    s, fs = sec(size), sec(fsize)
    lines += ["## The binary's sections (bytes)", "", "| section | agent | floor |", "|---|---|---|"]
    for k in [".text", ".rodata", ".rela.dyn", ".data.rel.ro", ".eh_frame", ".gcc_except_table"]:
        lines.append(f"| {k} | {s.get(k, 0)} | {fs.get(k, 0)} |")
    if shutil.which("cargo-bloat"):
        bloat = subprocess.run(["cargo", "bloat", "--release", "--crates", "--bin",
                                "exalsius-node-agent", "-n", "25"], cwd=ROOT,
                               capture_output=True, text=True).stdout
        lines += ["", "## .text by crate (`cargo bloat --release --crates`)", "", "```",
                  bloat.strip(), "```"]
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.join(ROOT, "bench/results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench/results/footprint.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()

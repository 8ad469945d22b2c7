#!/usr/bin/env python3
"""What the resident memory of `run` is made of (issue 22): python3 bench/footprint.py [RUNS]

Builds the release agent and the floor (examples/floor.rs), serves
PATCH /node/{id} on loopback, and runs each RUNS times (default 5) for ~150 heartbeats at 50 ms:

- the agent with EXALSIUS_FOOTPRINT_MARKS (src/footprint.rs): resident memory after each phase
  of start-up and after the 1st/10th/100th heartbeat — the growth between two marks is what
  that phase cost (the first phase to touch shared code, std's formatting say, pays for it);
- agent and floor: resident memory by mapping (the binary, libc, heap, the rest) from
  /proc/PID/smaps;
- the binary's resident pages by section (present bits of /proc/PID/pagemap): what of .text,
  .rodata, the relocations is mapped;
- the binary's sections (`size -A`) and, when cargo-bloat is installed, .text by crate.

Writes bench/results/footprint.md (medians) and prints it.

python3 bench/footprint.py --gpu-hosts [RUNS] (default 3): the GPU-host rows only (issue 30),
with the release agent already built: the daemon's peak RSS as an unprivileged user with
`gpu = "off"` and with `gpu = "nvml"` and the real libnvidia-ml 535 and 550 (from
packaging/fetch-nvidia.sh's cache, $EXALSIUS_NVIDIA_CACHE; init fails here, no GPU), side by
side, and the cost of one NVML probe child (peak RSS, CPU ms, wall ms) with each library and
with the stub. Writes bench/results/footprint-gpu.md.
"""
import http.server
import json
import os
import re
import shutil
import struct
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 5
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


def sections(exe):
    """name -> (address, size) of the sections that are loaded."""
    out = {}
    text = subprocess.run(["readelf", "-SW", exe], capture_output=True, text=True).stdout
    for line in text.splitlines():
        m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)", line)
        if m and int(m.group(2), 16):
            out[m.group(1)] = (int(m.group(2), 16), int(m.group(3), 16))
    return out


def resident_by_section(pid, exe):
    """KiB of each section of exe that is mapped in pid (a page shared by two counts for both)."""
    secs = sections(exe)
    maps = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            p = line.split()
            if len(p) >= 6 and p[5] == exe:
                lo, hi = (int(x, 16) for x in p[0].split("-"))
                maps.append((lo, hi))
    if not maps:
        return {}
    bias = maps[0][0]  # the first mapping is file offset 0, address 0 of the PIE
    present = set()
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        for lo, hi in maps:
            for a in range(lo, hi, 4096):
                pm.seek(a // 4096 * 8)
                if struct.unpack("<Q", pm.read(8))[0] >> 63:
                    present.add((a - bias) // 4096)
    out = {}
    for name, (addr, size) in secs.items():
        pages = range(addr // 4096, (addr + size + 4095) // 4096)
        out[name] = (sum(4 for pg in pages if pg in present), len(pages) * 4)
    return out


def run_agent(url, work, exe):
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
    maps["sections"] = resident_by_section(p.pid, os.path.realpath(exe))
    p.kill()
    p.wait()
    phases = []
    for line in open(marks):
        name, rss, anon, file, hwm = line.rstrip("\n").split("\t")
        phases.append((name, int(rss), int(anon), int(file)))
    return phases, maps


NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
CACHE = os.environ.get("EXALSIUS_NVIDIA_CACHE", "/var/cache/exalsius-ci/nvidia")


def real_library(generation):
    for d, _, files in os.walk(os.path.join(CACHE, generation)):
        if "libnvidia-ml.so.1" in files:
            return os.path.join(d, "libnvidia-ml.so.1")
    return None


def run_daemon_as_nobody(url, work, exe, gpu, library):
    """Peak RSS (VmHWM, KiB) of `run` as nobody after ~100 heartbeats, with NVML probed at
    start and at every inventory refresh (1 s here: ~5 probes)."""
    state = os.path.join(work, "state")
    shutil.rmtree(state, ignore_errors=True)
    cfg = os.path.join(work, "agent.toml")
    lib = f'nvml_library = "{library}"\n' if library else ""
    with open(cfg, "w") as f:
        f.write(f'[api]\nurl = "{url}"\nnode_id = "{NODE}"\naccess_token = "boot"\n'
                f'[heartbeat]\ninterval = "50ms"\njitter = 0.0\n[inventory]\ngpu = "{gpu}"\n'
                f'refresh_interval = "1s"\n{lib}[state]\ndir = "{state}"\n[log]\nlevel = "warn"\n')
    os.chmod(cfg, 0o600)
    os.chown(cfg, 65534, 65534)
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    before = Api.count
    p = subprocess.Popen(NOBODY + [exe, "--config", cfg, "run"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and Api.count - before < 100:
        time.sleep(0.05)
    time.sleep(5.5)  # ≥ 5 inventory refreshes, each a probe child
    hwm = 0
    with open(f"/proc/{p.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    p.kill()
    p.wait()
    return hwm


def probe_cost(exe, library):
    """One probe child as nobody: (peak RSS KiB, CPU ms, wall ms). The peak comes from GNU
    time: a process's peak includes what it had before exec (Python's own ~20 MiB, were it
    forked from here), and time's is ~1.5 MiB."""
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    r = subprocess.run(["/usr/bin/time", "-f", "%M"] + NOBODY + [exe, "nvml-probe", "--library", library],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    wall = (time.monotonic() - t) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) * 1000
    return int(r.stderr.strip().splitlines()[-1]), cpu, wall


def gpu_hosts(runs, agent=None):
    agent = agent or os.path.join(ROOT, "target/release/exalsius-node-agent")
    if not os.path.exists(agent):
        subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "exalsius-node-agent"],
                       cwd=ROOT, check=True)
    libs = {g: real_library(g) for g in ["535", "550"]}
    if not all(libs.values()):
        sys.exit(f"no real libnvidia-ml under {CACHE}: run packaging/fetch-nvidia.sh")
    work = tempfile.mkdtemp()
    os.chmod(work, 0o755)
    stub_dir = os.path.join(work, "stub")
    os.mkdir(stub_dir)
    stub = os.path.join(stub_dir, "libnvidia-ml.so.1")
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", stub,
                    os.path.join(ROOT, "tests/support/fake_nvml.c")], check=True)
    with open(os.path.join(stub_dir, "fake_nvml.conf"), "w") as f:
        f.write("count=8\n")
    os.chown(work, 65534, 65534)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    rows = {"off": [], "535": [], "550": []}
    for _ in range(runs):  # side by side: off, 535, 550, off, …
        rows["off"].append(run_daemon_as_nobody(url, work, agent, "off", None))
        for g in ["535", "550"]:
            rows[g].append(run_daemon_as_nobody(url, work, agent, "nvml", libs[g]))
    costs = {}
    for name, lib in [("stub (8 GPUs)", stub), ("535", libs["535"]), ("550", libs["550"])]:
        probe_cost(agent, lib)  # warm the page cache
        costs[name] = [probe_cost(agent, lib) for _ in range(max(runs, 5))]
    shutil.rmtree(work, ignore_errors=True)
    med = lambda xs: statistics.median(xs)
    off = med(rows["off"])
    lines = ["# The daemon's peak RSS on a GPU host (`python3 bench/footprint.py --gpu-hosts`)", "",
             f"{runs} runs each, alternating, as an unprivileged user (nobody); `run` for ~100 "
             "heartbeats at 50 ms and ≥ 5 inventory refreshes (1 s), each an NVML probe child. "
             "Medians of VmHWM in KiB (the daemon process; the probe child is its own process).", "",
             "| host | daemon peak RSS | × GPUs off | runs |", "|---|---|---|---|",
             f"| GPUs off (`gpu = \"off\"`) | {off:.0f} | 1.00× | {rows['off']} |"]
    for g in ["535", "550"]:
        v = med(rows[g])
        lines.append(f"| GPU host (real libnvidia-ml {g}, init failing here) | {v:.0f} | "
                     f"{v / off:.2f}× | {rows[g]} |")
    lines += ["", "## One NVML probe child (the cost of one inventory refresh's NVML query)", "",
              "| library | child peak RSS (KiB) | CPU ms | wall ms |", "|---|---|---|---|"]
    for name, samples in costs.items():
        lines.append(f"| {name} | {med([s[0] for s in samples]):.0f} | "
                     f"{med([s[1] for s in samples]):.1f} | {med([s[2] for s in samples]):.1f} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.join(ROOT, "bench/results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench/results/footprint-gpu.md"), "w") as f:
        f.write(text)
    print(text)


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
    # The agent on its own, as packaging/build.sh builds it: built in one command with the
    # example, its dependencies would get the dev-dependencies' features.
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "exalsius-node-agent"],
                   cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "--locked", "--example", "floor"], cwd=ROOT, check=True)
    agent = os.path.join(ROOT, "target/release/exalsius-node-agent")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    work = tempfile.mkdtemp()
    agent_runs, floor_runs = [], []
    for _ in range(RUNS):  # side by side: agent, floor, agent, …
        agent_runs.append(run_agent(url, work, agent))
        floor_runs.append(run_floor(url))
    shutil.rmtree(work, ignore_errors=True)

    med = lambda xs: int(statistics.median(xs))
    lines = [f"# Footprint of `run`: where the resident memory goes",
             "",
             f"`python3 bench/footprint.py` — {RUNS} runs each, agent and floor alternating, "
             "medians in KiB; ~150 heartbeats at 50 ms against a loopback API, `gpu = \"auto\"` "
             "(no NVIDIA driver on the machine that ran it). *Agent*: the release build.",
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
              "| mapping | agent | floor | agent − floor |", "|---|---|---|---|"]
    for key in ["binary", "libc", "heap", "rest", "RssAnon", "RssFile", "VmHWM"]:
        a = med([r[1][key] for r in agent_runs])
        f = med([r[key] for r in floor_runs])
        lines.append(f"| {key} | {a} | {f} | {a - f:+d} |")
    a = med([r[1]["VmHWM"] for r in agent_runs])
    f = med([r["VmHWM"] for r in floor_runs])
    lines += ["", f"Peak RSS ratio (medians): **{a / f:.2f}×** the floor. Each run's peak: agent "
              f"{[r[1]['VmHWM'] for r in agent_runs]}, floor {[r['VmHWM'] for r in floor_runs]}.",
              "", "## The agent binary's resident pages by section, after ~150 heartbeats", "",
              "| section | agent: resident / size |", "|---|---|"]
    names = sorted({n for r in agent_runs for n in r[1]["sections"]},
                   key=lambda n: -max(r[1]["sections"].get(n, (0, 0))[1] for r in agent_runs))
    cell = lambda runs, n: (f"{med([r[1]['sections'][n][0] for r in runs])} / "
                            f"{runs[0][1]['sections'][n][1]}" if n in runs[0][1]["sections"] else "–")
    for n in names:
        if max(r[1]["sections"].get(n, (0, 0))[1] for r in agent_runs) >= 16:
            lines.append(f"| {n} | {cell(agent_runs, n)} |")
    lines.append("")

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
    if len(sys.argv) > 1 and sys.argv[1] == "--gpu-hosts":
        gpu_hosts(int(sys.argv[2]) if len(sys.argv) > 2 else 3)
    else:
        main()

#!/usr/bin/env python3
"""What the service's memory cgroup sees of two builds (issue 30 item 5: it did not see the
link-time hot-text ordering's 1.1 MiB of RssFile, which was then removed; docs/benchmarks.md).

python3 bench/cgroup-file-pages.py FIRST SECOND [RUNS]

Runs each binary (`run --dry-run`, gpu off, 50 ms heartbeats, 8 s) in a memory cgroup of its
own, made by hand under this process's (v2: memory.current / memory.stat; v1:
memory.usage_in_bytes / memory.stat), the way systemd gives the unit one, twice per run:
- "page cache warm": the binary's pages are already cached (as after `apt-get install`, which
  wrote them from another cgroup);
- "page cache cold": the binary's pages evicted first (posix_fadvise DONTNEED), so the service
  faults them in itself (a reboot, or memory pressure).
Prints medians in KiB: what the cgroup is charged (total, file, anon) and the process's own
RssFile / RssAnon. The binary's file pages are charged to the cgroup that first read them.
"""
import os
import statistics
import subprocess
import sys
import tempfile
import time


def own_cgroup():
    for line in open("/proc/self/cgroup"):
        hid, ctrls, path = line.rstrip("\n").split(":", 2)
        if hid == "0" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            return "v2", "/sys/fs/cgroup" + path
        if "memory" in ctrls.split(","):
            return "v1", "/sys/fs/cgroup/memory" + path
    sys.exit("no memory cgroup")


def stat(kind, cg):
    s = dict(l.split() for l in open(os.path.join(cg, "memory.stat")))
    if kind == "v2":
        total = int(open(os.path.join(cg, "memory.current")).read())
        return total // 1024, int(s["file"]) // 1024, int(s["anon"]) // 1024
    total = int(open(os.path.join(cg, "memory.usage_in_bytes")).read())
    return total // 1024, int(s["cache"]) // 1024, int(s["rss"]) // 1024


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def once(kind, parent, exe, cold, work):
    cg = os.path.join(parent, f"exalsius-bench-{os.getpid()}")
    os.mkdir(cg)
    try:
        cfg = os.path.join(work, "agent.toml")
        with open(cfg, "w") as f:
            f.write('[api]\nurl = "http://127.0.0.1:9/v1"\n'
                    'node_id = "0a0a0a0a-0000-4000-8000-000000000001"\naccess_token = "boot"\n'
                    '[heartbeat]\ninterval = "50ms"\njitter = 0.0\n[inventory]\ngpu = "off"\n'
                    f'[state]\ndir = "{work}/state"\n[log]\nlevel = "warn"\n')
        if cold:
            evict(exe)
        else:
            open(exe, "rb").read()

        def enter():
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

        p = subprocess.Popen([exe, "--config", cfg, "run", "--dry-run"], preexec_fn=enter,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(8)
        total, file, anon = stat(kind, cg)
        status = dict(l.split(":", 1) for l in open(f"/proc/{p.pid}/status"))
        rss_file = int(status["RssFile"].split()[0])
        rss_anon = int(status["RssAnon"].split()[0])
        p.kill()
        p.wait()
        return total, file, anon, rss_file, rss_anon
    finally:
        time.sleep(0.2)
        os.rmdir(cg)


def main():
    first, second = sys.argv[1], sys.argv[2]
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    kind, parent = own_cgroup()
    work = tempfile.mkdtemp()
    res = {}
    for _ in range(runs):
        for cold in (False, True):
            for name, exe in ((os.path.basename(first), first), (os.path.basename(second), second)):
                res.setdefault((name, cold), []).append(once(kind, parent, exe, cold, work))
    med = lambda xs: int(statistics.median(xs))
    print(f"cgroup {kind}, {runs} runs each, medians in KiB\n")
    print("| binary | page cache | cgroup total | cgroup file | cgroup anon | RssFile | RssAnon |")
    print("|---|---|---|---|---|---|---|")
    for (name, cold), rows in sorted(res.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cols = " | ".join(str(med([r[i] for r in rows])) for i in range(5))
        print(f"| {name} | {'cold' if cold else 'warm'} | {cols} |")


if __name__ == "__main__":
    main()

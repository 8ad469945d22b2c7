"""The GPU proof (issue 15): what the agent reports, side by side with nvidia-smi.

Run through bench/gpu-check.sh, which finds the binary and, with --stub, builds the stub NVML
and a matching fake nvidia-smi. Prints a Markdown report (also written to --out) and exits 1 on
any disagreement:
  - inventory --verbose-json through NVML (gpu = "nvml") and through the PCI scan
    (gpu = "pci"): count, names, memory must agree with each other and with nvidia-smi
    (NVML vs nvidia-smi: exact MiB, UUID, bus id; PCI vs NVML: name and GiB as the API gets it);
  - each GPU health check's raw NVML answer per GPU (issue 32), which shows which checks the
    driver offers (NOT_SUPPORTED, not_in_library: not available; the GPU counts);
  - NVML init time (the first refresh) and time per refresh (the later ones), from the
    daemon's own "inventory refreshed took_ms" lines;
  - peak RSS (VmHWM) of `run --dry-run` with NVML loaded vs gpu = "off", side by side;
  - SIGTERM during a refresh: the exit status and how long the stop took;
  - the product as shipped: the same NVML inventory run under the packaged unit's sandbox
    (`systemd-run` with every sandboxing line of the unit's [Service] section: DevicePolicy,
    DeviceAllow, SystemCallFilter, MemoryDenyWriteExecute, PrivateUsers, ...) must equal the
    plain binary's; without systemd as PID 1 it says "NOT PROVEN" (and does not fail).
"""
import argparse
import json
import os
import shutil
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

failures = []
lines = []


def say(text=""):
    lines.append(text)
    print(text, flush=True)


def fail(what):
    failures.append(what)
    say(f"**DISAGREE**: {what}")


def norm_bus(bus):
    """00000000:17:00.0 (NVML, nvidia-smi) and 0000:17:00.0 (sysfs) → 0000:17:00.0."""
    bus = bus.strip().lower()
    dom, _, rest = bus.partition(":")
    try:
        return "%04x:%s" % (int(dom, 16), rest)
    except ValueError:
        return bus


def gib(mib):
    return int(mib / 1024 + 0.5)


def config(path, gpu, lib, refresh="1s"):
    text = '[inventory]\ngpu = "%s"\nrefresh_interval = "%s"\n' % (gpu, refresh)
    if lib:
        text += 'nvml_library = "%s"\n' % lib
    text += '[heartbeat]\ninterval = "1s"\njitter = 0.0\n[log]\nlevel = "exalsius_node_agent=debug,warn"\n'
    with open(path, "w") as f:
        f.write(text)
    return path


def inventory(args, gpu, cfg):
    cmd = [args.bin, "--config", cfg, "inventory", "--verbose-json", "--gpu", gpu]
    if args.root:
        cmd += ["--root", args.root]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        fail(f"inventory --gpu {gpu} exited {out.returncode}: {out.stderr.strip()}")
        return []
    return json.loads(out.stdout)["details"]["gpus"]


def smi(args):
    query = ["nvidia-smi", "--query-gpu=name,memory.total,uuid,pci.bus_id,driver_version",
             "--format=csv,noheader,nounits"]
    try:
        version = subprocess.run(["nvidia-smi", "--version"], capture_output=True, text=True,
                                 timeout=60).stdout.strip()
        out = subprocess.run(query, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        fail("nvidia-smi not found")
        return "", []
    rows = []
    for line in out.stdout.strip().splitlines():
        name, mem, uuid, bus, driver = [c.strip() for c in line.split(",")]
        rows.append({"name": name, "mib": int(mem), "uuid": uuid, "bus": norm_bus(bus),
                     "driver": driver})
    return version, rows


def table(title, rows, cols):
    say(f"\n{title}\n")
    say("| " + " | ".join(cols) + " |")
    say("|" + "---|" * len(cols))
    for r in rows:
        say("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


HEALTH_CHECKS = [
    ("remapped_rows", "nvmlDeviceGetRemappedRows"),
    ("retired_pages_pending", "nvmlDeviceGetRetiredPagesPendingStatus"),
    ("mig_mode", "nvmlDeviceGetMigMode"),
    ("fabric", "nvmlDeviceGetGpuFabricInfo[V]"),
]


def answer_text(a):
    """One raw answer as the agent's JSON carries it: {"value": {...}}, "not_supported",
    "not_in_library", "reset_required", "gpu_lost", {"failed": "..."}."""
    if isinstance(a, dict) and "value" in a:
        v = a["value"]
        if isinstance(v, dict):
            return " ".join(f"{k}={json.dumps(x)}" for k, x in v.items())
        return json.dumps(v)
    if isinstance(a, dict) and "failed" in a:
        return "error: " + a["failed"]
    return str(a).upper() if a in ("not_supported", "reset_required", "gpu_lost") else str(a)


def health_table(gpus):
    """Issue 32: each health check's raw answer per GPU, so the first run on a driver shows
    which checks it offers (NOT_SUPPORTED / not_in_library: the check is not available)."""
    rows = []
    for g in gpus:
        h = g.get("health")
        if h is None:
            continue
        row = {"gpu": g["index"], "bus": norm_bus(g["bus_id"])}
        for key, _ in HEALTH_CHECKS:
            row[key] = answer_text(h.get(key))
        fatal = h.get("fatal") or []
        row["other queries"] = ", ".join(f"{q}: {answer_text(a)}" for q, a in fatal) or "-"
        rows.append(row)
    if not rows:
        say("\nNo NVML health answers (no NVML GPU).")
        return
    table("Health checks, raw answers per GPU (" + ", ".join(f"{k} = `{s}`" for k, s in HEALTH_CHECKS) + ")",
          rows, ["gpu", "bus"] + [k for k, _ in HEALTH_CHECKS] + ["other queries"])


def agent_rows(gpus):
    return [{"name": g["name"],
             "mib": (g.get("memory_bytes") or 0) // (1 << 20),
             "uuid": g.get("uuid") or "-",
             "bus": norm_bus(g["bus_id"]),
             "source": g["source"]} for g in gpus]


def compare(smi_rows, nvml, pci):
    if len(nvml) != len(smi_rows):
        fail(f"NVML sees {len(nvml)} GPUs, nvidia-smi {len(smi_rows)}")
    by_bus = {r["bus"]: r for r in smi_rows}
    for g in nvml:
        s = by_bus.get(g["bus"])
        if s is None:
            fail(f"NVML GPU at {g['bus']} is not in nvidia-smi's list")
            continue
        for key in ("name", "mib", "uuid"):
            if g[key] != s[key]:
                fail(f"{g['bus']}: {key} is {g[key]!r} through NVML, {s[key]!r} in nvidia-smi")
    pci_nv = [g for g in pci if g["name"].startswith(("NVIDIA", "Tesla"))]
    if len(pci_nv) != len(nvml):
        fail(f"the PCI scan sees {len(pci_nv)} NVIDIA GPUs, NVML {len(nvml)}")
    pci_by_bus = {g["bus"]: g for g in pci_nv}
    for g in nvml:
        p = pci_by_bus.get(g["bus"])
        if p is None:
            fail(f"NVML GPU at {g['bus']} is not on the PCI scan")
            continue
        if p["name"] != g["name"]:
            fail(f"{g['bus']}: PCI names it {p['name']!r}, NVML {g['name']!r} (gpu_type would flap)")
        if gib(p["mib"]) != gib(g["mib"]):
            fail(f"{g['bus']}: PCI says {gib(p['mib'])} GiB, NVML {gib(g['mib'])} GiB (gpu_memory would flap)")


# [Service] lines of the unit that are not sandboxing: how the service runs, not what it may do.
NOT_SANDBOX = ("Type", "NotifyAccess", "ExecStart", "ExecReload", "Restart", "RestartSec",
               "RestartPreventExitStatus", "WatchdogSec", "TimeoutStopSec", "StateDirectory",
               "StateDirectoryMode", "User", "Group")


def unit_sandbox(unit):
    """The [Service] sandboxing properties of the unit file, as systemd-run -p arguments."""
    props, section = [], None
    for line in open(unit):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        key = line.split("=", 1)[0]
        if section == "[Service]" and key not in NOT_SANDBOX:
            props += ["-p", line]
    return props


def sandboxed_inventory(args, gpu, cfg_text):
    """inventory --verbose-json under the unit's sandbox, or None (NOT PROVEN) without systemd."""
    state = subprocess.run(["systemctl", "is-system-running"], capture_output=True, text=True)
    if shutil.which("systemd-run") is None or state.stdout.strip() in ("", "offline"):
        say(f"\nNOT PROVEN: no systemd as PID 1 here (`systemctl is-system-running`: "
            f"{state.stdout.strip() or state.stderr.strip() or 'no answer'}): the GPUs under the "
            "unit's sandbox were not checked; packaging/test-packages.sh proves the unit against "
            "a stub NVML that opens NVIDIA-like device nodes")
        return None
    unit = next((u for u in ("/lib/systemd/system/exalsius-node-agent.service",
                             "/usr/lib/systemd/system/exalsius-node-agent.service",
                             "systemd/exalsius-node-agent.service") if os.path.exists(u)))
    # Readable under ProtectHome/PrivateTmp/ProtectSystem=strict by a dynamic user.
    run_dir = tempfile.mkdtemp(prefix="exalsius-gpu-check-", dir="/run")
    os.chmod(run_dir, 0o755)
    shutil.copy(args.bin, os.path.join(run_dir, "exalsius-node-agent"))
    with open(os.path.join(run_dir, "agent.toml"), "w") as f:
        f.write(cfg_text)
    os.chmod(os.path.join(run_dir, "agent.toml"), 0o644)
    cmd = ["systemd-run", "--wait", "--pipe", "--collect", "--quiet", "-p", "DynamicUser=yes",
           *unit_sandbox(unit), os.path.join(run_dir, "exalsius-node-agent"),
           "--config", os.path.join(run_dir, "agent.toml"), "inventory", "--verbose-json",
           "--gpu", gpu]
    if args.root:
        cmd += ["--root", os.path.abspath(args.root)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    shutil.rmtree(run_dir, ignore_errors=True)
    say(f"\nUnder the sandbox of `{unit}` (systemd-run, DynamicUser=yes, "
        f"{len(unit_sandbox(unit)) // 2} properties): exit {out.returncode}")
    if out.returncode != 0:
        fail(f"inventory under the unit's sandbox exited {out.returncode}: {out.stderr.strip()[-400:]}")
        return []
    details = json.loads(out.stdout)["details"]
    for note in details.get("gpu_notes", []):
        say(f"- note under the sandbox: {note}")
    return details["gpus"]


def daemon(args, cfg, seconds, stop_after=None):
    """Runs `run --dry-run`; returns (peak RSS KiB, refresh ms list, exit code, stop seconds)."""
    proc = subprocess.Popen([args.bin, "--config", cfg, "run", "--dry-run"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    hwm = 0
    deadline = time.monotonic() + (stop_after if stop_after is not None else seconds)
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                m = re.search(r"VmHWM:\s+(\d+) kB", f.read())
                hwm = max(hwm, int(m.group(1))) if m else hwm
        except OSError:
            pass
        time.sleep(0.05)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    took = time.monotonic() - started
    ms = [int(m) for m in re.findall(r"took_ms=(\d+)", err)]
    return hwm, ms, proc.returncode, took


def probe_child(args, runs=5):
    """The NVML probe child alone (`nvml-probe`, what every refresh starts): medians of its
    peak RSS (KiB, from GNU time: a child forked from Python would count Python's pages), CPU
    ms and wall ms, and its answer."""
    import resource
    cmd = ["/usr/bin/time", "-f", "%M", args.bin, "nvml-probe"] + (["--library", args.lib] if args.lib else [])
    rows, answer = [], ""
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = (time.monotonic() - t) * 1000
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) * 1000
        rows.append((int(r.stderr.strip().splitlines()[-1]), cpu, wall))
        answer = r.stdout
    med = lambda i: statistics.median(r[i] for r in rows)
    return med(0), med(1), med(2), answer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--lib", help="libnvidia-ml to load (default: the system's)")
    ap.add_argument("--root", help="PCI scan below this root (the stub's fixture host)")
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--stub", action="store_true")
    ap.add_argument("--block-conf", help="stub only: the conf file to make NVML block")
    ap.add_argument("--out")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    nvml_cfg = config(os.path.join(tmp, "nvml.toml"), "nvml", args.lib)
    pci_cfg = config(os.path.join(tmp, "pci.toml"), "pci", args.lib)
    off_cfg = config(os.path.join(tmp, "off.toml"), "off", None)

    say("# GPU check" + (" (stub NVML, fixture PCI tree: not a real GPU)" if args.stub else ""))
    say(f"\nbinary: `{args.bin}` ({subprocess.run([args.bin, '--version'], capture_output=True, text=True).stdout.strip()}), "
        f"host: `{os.uname().nodename}`, kernel {os.uname().release}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
    version, smi_rows = smi(args)
    say("\n`nvidia-smi --version`:\n\n```\n" + version + "\n```")
    table("`nvidia-smi --query-gpu=name,memory.total,uuid,pci.bus_id,driver_version`",
          smi_rows, ["name", "mib", "uuid", "bus", "driver"])
    nvml_gpus = inventory(args, "nvml", nvml_cfg)
    nvml = agent_rows(nvml_gpus)
    pci = agent_rows(inventory(args, "pci", pci_cfg))
    table('`inventory --verbose-json` with gpu = "nvml"', nvml, ["name", "mib", "uuid", "bus", "source"])
    table('`inventory --verbose-json` with gpu = "pci"', pci, ["name", "mib", "uuid", "bus", "source"])
    compare(smi_rows, nvml, pci)
    health_table(nvml_gpus)
    if not failures:
        say(f"\nNVML, the PCI scan and nvidia-smi agree on {len(nvml)} GPU(s).")
    with open(nvml_cfg) as f:
        sandboxed = sandboxed_inventory(args, "nvml", f.read())
    if sandboxed is not None:
        boxed = agent_rows(sandboxed)
        table('`inventory --verbose-json` with gpu = "nvml" under the unit\'s sandbox', boxed,
              ["name", "mib", "uuid", "bus", "source"])
        if boxed != nvml:
            fail(f"under the unit's sandbox the agent sees {len(boxed)} GPU(s), outside {len(nvml)}: "
                 "the unit keeps NVML from the GPUs")
        else:
            say(f"\nUnder the unit's sandbox the agent sees the same {len(boxed)} GPU(s).")

    # Footprint and refresh timing, side by side in one run.
    hwm_nvml, ms, code1, _ = daemon(args, nvml_cfg, args.seconds)
    hwm_off, ms_off, code2, _ = daemon(args, off_cfg, args.seconds)
    say(f"\n## Footprint and timing (`run --dry-run`, {args.seconds} s each, refresh every 1 s)\n")
    say("| | value |\n|---|---|")
    say(f"| peak RSS, gpu = \"nvml\" | {hwm_nvml} KiB |")
    say(f"| peak RSS, gpu = \"off\" | {hwm_off} KiB |")
    if hwm_off:
        say(f"| NVML's cost to the daemon | {hwm_nvml - hwm_off} KiB ({hwm_nvml / hwm_off:.2f}×) |")
        if hwm_nvml > 1.2 * hwm_off:
            fail(f"the daemon's peak RSS with NVML is {hwm_nvml / hwm_off:.2f}× gpu = off (want ≤ 1.2×: "
                 "the vendor library belongs in the probe child)")
    rss, cpu, wall, answer = probe_child(args)
    say(f"| one NVML probe child (init + all GPUs), median of 5: peak RSS | {rss:.0f} KiB |")
    say(f"| … CPU | {cpu:.1f} ms |")
    say(f"| … wall | {wall:.1f} ms |")
    if not answer.startswith('{"data"'):
        fail(f"the NVML probe child did not answer with data: {answer[:120]}")
    if ms:
        # A refresh is the whole collection (CPU, disks, versions, GPUs); gpu = "off" beside
        # it shows what NVML adds.
        say(f"| first refresh, gpu = \"nvml\" (includes NVML init) | {ms[0]} ms |")
        if len(ms) > 1:
            say(f"| later refreshes, gpu = \"nvml\", median of {len(ms) - 1} | {statistics.median(ms[1:])} ms |")
        if len(ms_off) > 1:
            say(f"| later refreshes, gpu = \"off\", median of {len(ms_off) - 1} | {statistics.median(ms_off[1:])} ms |")
    else:
        fail("no 'inventory refreshed took_ms' lines from the daemon")
    for code, what in ((code1, "nvml"), (code2, "off")):
        if code != 0:
            fail(f"run --dry-run (gpu = {what}) exited {code} after SIGTERM")

    # SIGTERM during a refresh.
    if args.block_conf:
        with open(args.block_conf, "a") as f:
            f.write("block_secs=30\n")
        stop_after = 2.5  # the stub now blocks every refresh for 30 s
    else:
        stop_after = 0.3  # a real driver: hit the first refresh (NVML init)
    _, _, code, took = daemon(args, nvml_cfg, 0, stop_after=stop_after)
    say(f"\nSIGTERM {stop_after} s after start{' (NVML blocked in a refresh)' if args.block_conf else ' (during the first refresh)'}: "
        f"exit status {code} in {took * 1000:.0f} ms")
    if code != 0 or took > 2.0:
        fail(f"SIGTERM during a refresh: exit {code} after {took:.1f} s (want 0 within 2 s)")

    say("\n" + ("**FAILED**: " + "; ".join(failures) if failures else "**OK**: no disagreement."))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

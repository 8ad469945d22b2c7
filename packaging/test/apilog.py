"""Checks on the stand-in API's log (packaging/standin_api.py: one JSON object a request), for
the package test's phases (packaging/test/lib.sh calls it as `apilog CHECK ARGS...`).

    python3 apilog.py CHECK LOG [ARGS...]

A check that fails raises (exit 1, the assertion on stderr); some print a figure.
"""
import json
import sys


def rows(log):
    with open(log) as f:
        return [json.loads(line) for line in f]


def all_ok(log):
    """Every request was answered 200."""
    r = rows(log)
    assert all(x["status"] == 200 for x in r), [x for x in r if x["status"] != 200]


def body(log):
    """Every request answered 200; the first carried a NodePatchRequest body."""
    r = rows(log)
    assert all(x["status"] == 200 for x in r), r
    b = r[0]["body"]
    assert set(b) >= {"hardware", "software", "system"}, b
    assert b["hardware"]["cpu_cores"] >= 1 and b["system"]["kernel"], b


def resumed(log, boot, before):
    """All 200; the first request after BEFORE did not fall back to the configured token BOOT."""
    r = rows(log)
    after = r[int(before):]
    assert all(x["status"] == 200 for x in r), [x for x in r if x["status"] != 200]
    assert after[0]["auth"] != "Bearer " + boot, "fell back to the bootstrap token"


def registered(log, node):
    """The first request registered (POST, 201); NODE's heartbeats all 200. Prints their count."""
    r = rows(log)
    assert r and r[0]["method"] == "POST" and r[0]["status"] == 201, r[:1]
    beats = [x for x in r if x["node"] == node]
    assert all(x["status"] == 200 for x in beats), beats
    print(len(beats))


def last_gpu(log):
    """Prints the newest heartbeat body's "gpu_count|gpu_type|software.nvidia"."""
    bodies = [x["body"] for x in rows(log) if x.get("body")]
    b = bodies[-1] if bodies else {"hardware": {"gpu_count": -1, "gpu_type": ""}, "software": {"nvidia": ""}}
    print(f'{b["hardware"]["gpu_count"]}|{b["hardware"]["gpu_type"]}|{b["software"]["nvidia"]!r}')


def takeover(log, node, token):
    """NODE's first heartbeat carried TOKEN (the legacy one), the next a rotated one; all 200."""
    r = rows(log)
    beats = [x for x in r if x["node"] == node]
    assert len(beats) >= 2, r
    assert beats[0]["auth"] == "Bearer " + token and beats[0]["status"] == 200, beats[0]
    assert beats[1]["auth"] != beats[0]["auth"] and beats[1]["status"] == 200, beats[1]
    assert all(x["status"] == 200 for x in r), r


def count(log, node):
    """Prints how many requests NODE made."""
    print(sum(1 for x in rows(log) if x.get("node") == node))


def chain(log, node, boot, marks):
    """Every heartbeat of NODE answered 200, each with the token the answer before it issued;
    at MARKS (row numbers where a new process began) also the one before that. Prints the count."""
    marks = {int(m) for m in marks.split()}
    r = [x for x in rows(log) if x.get("node") == node]
    bad = [i for i, x in enumerate(r) if x["status"] != 200]
    assert r and not bad, f"heartbeats {bad} of {len(r)} were not answered 200"
    assert r[0]["auth"] == "Bearer " + boot, "the first heartbeat did not carry the configured token"
    for i in range(1, len(r)):
        want = ["Bearer " + r[i - 1]["issued"]]
        if i in marks:
            # The first heartbeat of a new process: the last answer of the old one may have been
            # cut off by the stop (SIGTERM ends a heartbeat in flight); then the token before it.
            want.append("Bearer " + (r[i - 2]["issued"] if i >= 2 else boot))
        assert r[i]["auth"] in want, f"heartbeat {i} carried neither the last rotated token nor (after a restart) the one before"
    print(len(r))


CHECKS = {"all-ok": all_ok, "body": body, "resumed": resumed, "registered": registered,
          "last-gpu": last_gpu, "takeover": takeover, "count": count, "chain": chain}

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in CHECKS:
        sys.exit(f"usage: apilog.py {'|'.join(CHECKS)} LOG [ARGS...]")
    CHECKS[sys.argv[1]](*sys.argv[2:])

"""Plots requests per second over the fleet benchmark (steady -> outage -> recovery)."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src, dst = sys.argv[1], sys.argv[2]
rows = list(csv.DictReader(open(src)))
t = [int(r["second"]) for r in rows]
fig, ax = plt.subplots(figsize=(9, 4), dpi=110)
ax.plot(t, [int(r["without_jitter"]) for r in rows], label="no jitter, no start splay", color="#d62728", lw=1.4)
ax.plot(t, [int(r["no_splay"]) for r in rows], label="as shipped without the start splay", color="#ff7f0e", lw=1.2)
ax.plot(t, [int(r["with_jitter"]) for r in rows], label="agent as shipped (start splay, equal jitter)", color="#1f77b4", lw=2)
ax.set_xlabel("seconds")
ax.set_ylabel("requests per second at the API")
ax.set_title("1,000 agents: steady, 30 s outage, recovery (interval 2 s, max_backoff 10 s)")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(dst)

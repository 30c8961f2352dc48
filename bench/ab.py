"""ppq against ppq: two revisions side by side in one run, rounds alternating.

    python bench/ab.py b976ff7 HEAD --rounds 3 --n 10000

Each revision is checked out (``git worktree``) into a temporary directory and
byte-compiled; then, round after round, ``bench/run.py --only ppq --rounds 1`` of
this checkout runs against each revision's ``ppq`` in turn (A, B, A, B...), so
that both see the same moments of a noisy machine. Prints the median of each
figure per revision and B/A. Leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
FIGURES = (
    ("ping_per_s", "ppq ping, one client (calls/s)"),
    ("enqueue_per_s", "enqueue, one call per task (tasks/s)"),
    ("bulk_per_s", "bulk enqueue (tasks/s)"),
    ("drain_per_s", "drain from spawn (tasks/s)"),
    ("drain_net_per_s", "drain net of start-up (tasks/s)"),
    ("lat_p50_ms", "push-to-start p50 (ms)"),
    ("lat_p99_ms", "push-to-start p99 (ms)"),
)


def checkout(rev: str, into: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(into), rev], check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(into / "ppq")], check=True,
                   stdout=subprocess.DEVNULL)
    return into


PING = """
import sys, time
from ppq.embedded import RedisServer, free_port
from ppq.config import load_config
from ppq.master import MasterServer
from ppq.rpc import PyroFunc
import subprocess, tempfile, socket
redis = RedisServer(tempfile.mkdtemp(prefix="ppq-ab-redis-"), appendonly=False).start()
port = free_port()
master = subprocess.Popen([sys.executable, "-m", "ppq", "master", "--port", str(port), "--redis-map", f"0={redis.url}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    call = PyroFunc(f"127.0.0.1:{port}", retry=50, timeout=5)
    for _ in range(500):
        call("ping")
    n, t = 5000, time.perf_counter()
    for _ in range(n):
        call("ping")
    print(n / (time.perf_counter() - t))
finally:
    master.terminate()
    master.wait()
    redis.stop()
"""


def ping_rate(tree: Path) -> float:
    """Sequential ``ping`` calls/s of one PyroFunc against a ``ppq master`` subprocess."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", PING], check=True, env=env, cwd=str(tree), capture_output=True,
                         text=True)
    return float(out.stdout.split()[-1])


def one_round(tree: Path, n: int, out: Path) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run([sys.executable, str(BENCH / "run.py"), "--only", "ppq", "--rounds", "1", "--n", str(n),
                    "--json", str(out)], check=True, env=env, cwd=str(tree), stdout=subprocess.DEVNULL)
    data = json.loads(out.read_text())
    rounds = data["systems"]["ppq"]["rounds"]
    row = dict(rounds[0]) if rounds else {}
    row["ping_per_s"] = ping_rate(tree)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--n", type=int, default=10000)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ppq-ab-"))
    trees = {}
    try:
        trees = {"A": checkout(args.a, tmp / "a"), "B": checkout(args.b, tmp / "b")}
        results: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
        for rnd in range(args.rounds):
            for name, tree in trees.items():
                row = one_round(tree, args.n, tmp / f"{name}-{rnd}.json")
                results[name].append(row)
                shown = ", ".join(f"{key} {row.get(key, float('nan')):.4g}" for key, _ in FIGURES)
                print(f"round {rnd + 1} {name}: {shown}", flush=True)
        print(f"\nmedians of {args.rounds} rounds, N = {args.n}: A = {args.a}, B = {args.b}")
        print(f"{'':40} {'A':>10} {'B':>10} {'B/A':>6}")
        for key, label in FIGURES:
            values = {name: [r[key] for r in rows if key in r] for name, rows in results.items()}
            if not values["A"] or not values["B"]:
                continue
            a, b = statistics.median(values["A"]), statistics.median(values["B"])
            print(f"{label:40} {a:10.4g} {b:10.4g} {b / a:6.2f}")
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

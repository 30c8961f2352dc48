"""bench/scale.py runs a real stack end to end: a small run, and its refusal of a bad configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

SCALE = REPO / "bench" / "scale.py"


def test_a_small_run_drains_every_task_and_its_saved_report_prints_the_same_tables(tmp_path: Path) -> None:
    saved = tmp_path / "scale.json"
    env = dict(os.environ, TMPDIR=str(tmp_path))  # its logs and redis-server directories
    run = subprocess.run([sys.executable, str(SCALE), "--configs", "2x2", "--n", "60", "--rounds", "1",
                          "--queues", "2", "--agents", "2", "--pushers", "2", "--json", str(saved)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(saved.read_text())
    [result] = data["results"]
    assert (result["masters"], result["shards"]) == (2, 2)
    for key in ("single", "bulk", "drain_single", "drain_bulk"):
        assert result[key]["n"] == 60 and result[key]["per_s"] > 0, key
        assert set(result[key]["us_per_task"]) == {"client", "master", "redis", "agent", "executor"}, key
    tables = run.stdout[:run.stdout.index("\n\n", run.stdout.index("CPU per task (us) by configuration"))]
    assert "client (pushers)" in tables and "executors" in tables
    again = subprocess.run([sys.executable, str(SCALE), "--report", str(saved)], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stderr
    assert tables in again.stdout


def test_a_bad_configuration_is_refused_by_name_before_anything_starts(tmp_path: Path) -> None:
    saved = tmp_path / "scale.json"
    run = subprocess.run([sys.executable, str(SCALE), "--configs", "1x1,2y", "--json", str(saved)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    assert "--configs: '2y' is not MASTERSxSHARDS" in run.stderr
    assert "logs in" not in run.stderr and not saved.exists()

"""A small mutation tester for ppq: one mutant at a time, in a copy of the tree.

ppq's tests start real redis-servers, masters and workers, so a tool that runs the
whole suite per mutant (mutmut) is far too slow here. This one changes one thing in
one file of a scratch copy of the repository, runs a chosen, fast test selection
there (``pytest -x``, with a timeout), records whether the mutant was killed, and
puts the file back.

Operators:

- Python (AST, the changed node's own text replaced in the source): comparisons
  flipped (``==``/``!=``, ``<``/``<=``, ``>``/``>=``, ``in``/``not in``, ``is``/``is not``),
  ``and``/``or``, ``+``/``-`` (and ``+=``/``-=``), ``*``/``//``, integer constants ±1,
  ``True``/``False``, ``not`` dropped, a statement (a call, an assignment to an
  attribute or item outside ``__init__``, a return, a raise, a ``break``/``continue``)
  replaced by ``pass``. Logging calls, docstrings,
  annotations and the insides of f-strings are left alone.
- Lua (text, line by line, comments skipped): ``==``/``~=``, ``<``/``<=``, ``>``/``>=``,
  ``+ 1``/``- 1``, ``and``/``or``, ``LPUSH``/``RPUSH``, a task state string swapped for
  another, and a whole ``redis.call`` line dropped (only lines that are a complete
  statement).

Usage (from the repository root; the results go to a JSON-lines file, one line per
mutant, and a run with the same file skips the mutants already recorded)::

    python tools/mutate.py --list                       # the mutants, without running
    nice -n 19 python tools/mutate.py --max 300 --out /tmp/mut.jsonl
    python tools/mutate.py --show 'ppq/store/lua/reap.lua:27:drop'   # a mutant's diff
    python tools/mutate.py --only 'ppq/store/lua/reap.lua:27:drop'   # run one again
    python tools/mutate.py --summary --out /tmp/mut.jsonl

``--max`` samples that many mutants (seeded, spread over the files in proportion
to their mutant counts); ``TARGETS`` below maps each file to its test selection.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Fast test selections: the store and master tests run in-process masters on real
# redis-servers in about 15 s; the worker ones start real worker processes.
# tests/test_task_states.py holds the tests written to kill survivors (run when present).
STORE_TESTS = ["tests/test_task_states.py", "tests/test_store_scripts.py", "tests/test_master.py"]
_W = "tests/test_worker.py::test_"
WORKER_TESTS = [_W + "seed_call_runs_and_records_result_state_and_worker",
                _W + "retry_then_dead_list_with_error_and_traceback",
                _W + "executor_killed_with_sigkill_is_replaced_and_its_task_reported",
                _W + "second_sigint_stops_at_once_and_hands_the_task_back",
                _W + "a_result_over_the_size_limit_fails_its_task_and_the_worker_goes_on",
                _W + "four_executors_run_four_sleeping_tasks_at_once",
                _W + "sigterm_with_a_short_task_timeout_hands_the_task_to_another_worker",
                _W + "task_past_its_timeout_is_killed_retried_and_the_pool_is_whole_again",
                _W + "short_tasks_prefetched_behind_a_long_one_go_to_the_idle_executor"]

# File -> the pytest arguments that judge its mutants.
TARGETS: dict[str, list[str]] = {
    "ppq/store/lua/report.lua": STORE_TESTS,
    "ppq/store/lua/lease.lua": STORE_TESTS,
    "ppq/store/lua/reap.lua": STORE_TESTS,
    "ppq/store/lua/push.lua": STORE_TESTS,
    "ppq/store/store.py": STORE_TESTS,
    "ppq/store/records.py": STORE_TESTS,
    "ppq/master/checks.py": STORE_TESTS,
    "ppq/master/waiting.py": STORE_TESTS,
    "ppq/worker/reporter.py": WORKER_TESTS,
    "ppq/worker/pool.py": WORKER_TESTS,
}

LUA_STATES = {"queued": "delayed", "delayed": "queued", "running": "queued", "failed": "queued",
              "dead": "failed", "done": "dead", "cancelled": "dead"}


@dataclass
class Mutant:
    path: str
    line: int
    op: str
    text: str  # the whole mutated file
    what: str  # one line: the change

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}:{self.op}"


# -- Python ---------------------------------------------------------------------------------------------

CMP_SWAP = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE,
            ast.GtE: ast.Gt, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.FloorDiv, ast.FloorDiv: ast.Mult}


def _skipped_ranges(tree: ast.AST) -> list[tuple[int, int]]:
    """Line ranges never mutated: docstrings, annotations and f-strings."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                out.append((body[0].lineno, body[0].end_lineno or body[0].lineno))
        if isinstance(node, ast.JoinedStr):
            out.append((node.lineno, node.end_lineno or node.lineno))
    return out


def _annotation_nodes(tree: ast.AST) -> set[int]:
    ids: set[int] = set()
    for node in ast.walk(tree):
        anns = []
        if isinstance(node, ast.arg) and node.annotation:
            anns.append(node.annotation)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
            anns.append(node.returns)
        if isinstance(node, ast.AnnAssign):
            anns.append(node.annotation)
        for ann in anns:
            ids.update(id(n) for n in ast.walk(ann))
    return ids


def _is_log_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
        and isinstance(node.func.value, ast.Name) and node.func.value.id in ("log", "logging", "logger")


def _replace(source: str, node: ast.AST, new: str) -> str:
    lines = source.splitlines(keepends=True)
    start = sum(len(x) for x in lines[:node.lineno - 1]) + _col(lines[node.lineno - 1], node.col_offset)
    end = sum(len(x) for x in lines[:node.end_lineno - 1]) + _col(lines[node.end_lineno - 1], node.end_col_offset)
    return source[:start] + new + source[end:]


def _col(line: str, byte_offset: int) -> int:
    """ast's column offsets count UTF-8 bytes."""
    return len(line.encode("utf-8")[:byte_offset].decode("utf-8", "replace"))


def python_mutants(path: str, source: str) -> Iterator[Mutant]:
    tree = ast.parse(source)
    skipped = _skipped_ranges(tree)
    annotations = _annotation_nodes(tree)
    in_log: set[int] = set()
    for node in ast.walk(tree):
        if _is_log_call(node):
            in_log.update(id(n) for n in ast.walk(node))

    def ok(node: ast.AST) -> bool:
        line = getattr(node, "lineno", None)
        if line is None or id(node) in annotations or id(node) in in_log:
            return False
        return not any(a <= line <= b for a, b in skipped)

    def expr(node: ast.expr, new: ast.expr, op: str, what: str) -> Mutant:
        text = _replace(source, node, "(" + ast.unparse(new) + ")")
        return Mutant(path, node.lineno, op, text, what)

    # Assignments worth dropping: to an attribute or an item, outside __init__ and the module
    # level (dropping the others only raises NameError or AttributeError, which any test notices).
    droppable: set[int] = set()
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) and func.name != "__init__":
            for node in ast.walk(func):
                if isinstance(node, ast.Assign) and all(isinstance(t, (ast.Attribute, ast.Subscript))
                                                        for t in node.targets):
                    droppable.add(id(node))
    for node in ast.walk(tree):
        if not ok(node):
            continue
        if isinstance(node, ast.Compare):
            for k, cmp in enumerate(node.ops):
                swap = CMP_SWAP.get(type(cmp))
                if swap:
                    new = ast.Compare(node.left, [*node.ops[:k], swap(), *node.ops[k + 1:]], node.comparators)
                    yield expr(node, new, f"cmp{k}@{node.col_offset}",
                               f"{type(cmp).__name__} -> {swap.__name__}")
        elif isinstance(node, ast.BoolOp):
            other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            yield expr(node, ast.BoolOp(other, node.values), f"boolop@{node.col_offset}",
                       f"{type(node.op).__name__} -> {type(other).__name__}")
        elif isinstance(node, ast.BinOp) and type(node.op) in BIN_SWAP:
            if isinstance(node.op, ast.Add) and any(isinstance(x, (ast.JoinedStr, ast.List)) or (
                    isinstance(x, ast.Constant) and isinstance(x.value, str)) for x in (node.left, node.right)):
                continue  # string or list concatenation: "-" is a TypeError, not a mutant worth a run
            swap = BIN_SWAP[type(node.op)]
            yield expr(node, ast.BinOp(node.left, swap(), node.right), f"binop@{node.col_offset}",
                       f"{type(node.op).__name__} -> {swap.__name__}")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            yield expr(node, node.operand, f"not@{node.col_offset}", "not dropped")
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            yield expr(node, ast.Constant(not node.value), f"bool@{node.col_offset}",
                       f"{node.value} -> {not node.value}")
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            for delta in (1, -1):
                yield expr(node, ast.Constant(node.value + delta), f"int{delta:+d}@{node.col_offset}",
                           f"{node.value} -> {node.value + delta}")
        elif isinstance(node, ast.AugAssign) and type(node.op) in (ast.Add, ast.Sub):
            swap = BIN_SWAP[type(node.op)]
            new = ast.AugAssign(node.target, swap(), node.value)
            yield Mutant(path, node.lineno, f"augassign@{node.col_offset}", _replace(source, node, ast.unparse(new)),
                         f"{type(node.op).__name__}= -> {swap.__name__}=")
        if isinstance(node, (ast.Expr, ast.Assign, ast.AugAssign, ast.Return, ast.Raise, ast.Break, ast.Continue)):
            if isinstance(node, ast.Expr) and not isinstance(node.value, ast.Call):
                continue
            if isinstance(node, ast.Expr) and _is_log_call(node.value):
                continue
            if isinstance(node, ast.Assign) and id(node) not in droppable:
                continue
            yield Mutant(path, node.lineno, f"drop@{node.col_offset}", _replace(source, node, "pass"),
                         f"{type(node).__name__} statement -> pass")


# -- Lua ------------------------------------------------------------------------------------------------

LUA_TEXT_OPS = [
    ("eq", r"==", "~="), ("ne", r"~=", "=="),
    ("le", r"<=", "<"), ("lt", r"<(?![=<])", "<="),
    ("ge", r">=", ">"), ("gt", r"(?<![-=~<>])>(?!=)", ">="),
    ("plus1", r"\+ 1\b", "- 1"), ("minus1", r"(?<![-\w])- 1\b", "+ 1"),
    ("and", r"\band\b", "or"), ("or", r"\bor\b", "and"),
    ("lpush", r"'LPUSH'", "'RPUSH'"), ("rpush", r"'RPUSH'", "'LPUSH'"),
]


def _strip_strings(line: str) -> str:
    """The line with the insides of its string literals blanked, so operators in text are not matched."""
    return re.sub(r"'[^']*'", lambda m: "'" + " " * (len(m.group()) - 2) + "'", line)


def lua_mutants(path: str, source: str) -> Iterator[Mutant]:
    lines = source.splitlines(keepends=True)
    for n, line in enumerate(lines, 1):
        code = line.split("--", 1)[0] if not line.lstrip().startswith("--") else ""
        if not code.strip():
            continue
        bare = _strip_strings(code)

        def mutated(start: int, end: int, new: str, n: int = n, line: str = line) -> str:
            return "".join(lines[:n - 1]) + line[:start] + new + line[end:] + "".join(lines[n:])

        for op, pattern, new in LUA_TEXT_OPS:
            target = code if op in ("lpush", "rpush") else bare
            for k, m in enumerate(re.finditer(pattern, target)):
                yield Mutant(path, n, f"{op}{k}", mutated(m.start(), m.end(), new),
                             f"{m.group()!r} -> {new!r}")
        for k, m in enumerate(re.finditer(r"'(" + "|".join(LUA_STATES) + r")'", code)):
            new = f"'{LUA_STATES[m.group(1)]}'"
            yield Mutant(path, n, f"state{k}", mutated(m.start(), m.end(), new), f"{m.group()} -> {new}")
        stripped = code.strip()
        complete = code.count("(") == code.count(")") and not stripped.endswith((",", "then", "do", "else"))
        if "redis.call(" in code and complete and (stripped.startswith("redis.call(")
                                                   or (stripped.startswith("if ") and stripped.endswith(" end"))):
            yield Mutant(path, n, "drop", "".join(lines[:n - 1]) + "-- (mutant) " + line + "".join(lines[n:]),
                         "line dropped")


def mutants_of(path: str) -> list[Mutant]:
    source = (REPO / path).read_text(encoding="utf-8")
    found = list(lua_mutants(path, source) if path.endswith(".lua") else python_mutants(path, source))
    seen: set[str] = set()
    out = []
    for m in found:  # ids are unique per file, line and operator
        if m.id not in seen and m.text != source:
            seen.add(m.id)
            out.append(m)
    return out


def sample(all_mutants: list[Mutant], limit: int, seed: int) -> list[Mutant]:
    """``limit`` mutants, each file's share in proportion to its count (at least one each)."""
    if limit <= 0 or limit >= len(all_mutants):
        return all_mutants
    rng = random.Random(seed)
    by_file: dict[str, list[Mutant]] = {}
    for m in all_mutants:
        by_file.setdefault(m.path, []).append(m)
    out = []
    for ms in by_file.values():
        share = max(1, round(limit * len(ms) / len(all_mutants)))
        out += rng.sample(ms, min(share, len(ms)))
    return out


# -- Running --------------------------------------------------------------------------------------------


def make_copy() -> Path:
    scratch = Path(tempfile.mkdtemp(prefix="ppq-mutate-"))
    copy = scratch / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".mypy_cache",
                                                               ".ruff_cache", ".pytest_cache"))
    return copy


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout', seconds, last lines of output)."""
    start = time.monotonic()
    tests = [t for t in tests if (copy / t.split("::")[0]).exists()]
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    proc = subprocess.Popen(cmd, cwd=copy, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = "passed" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = "timeout"
    tail = "\n".join(out.decode(errors="replace").strip().splitlines()[-3:])
    return status, time.monotonic() - start, tail


def run(mutants: list[Mutant], out_path: Path, timeout: float, copy: Path) -> None:
    done = set()
    if out_path.exists():
        done = {json.loads(line)["id"] for line in out_path.read_text().splitlines() if line.strip()}
    todo = [m for m in mutants if m.id not in done]
    print(f"{len(todo)} mutants to run ({len(done)} already recorded) in {copy}", flush=True)
    for k, m in enumerate(todo, 1):
        target = copy / m.path
        original = target.read_text(encoding="utf-8")
        target.write_text(m.text, encoding="utf-8")
        try:
            status, seconds, tail = run_tests(copy, TARGETS[m.path], timeout)
        finally:
            target.write_text(original, encoding="utf-8")
        verdict = "survived" if status == "passed" else "killed"
        record = {"id": m.id, "path": m.path, "line": m.line, "what": m.what, "verdict": verdict,
                  "status": status, "seconds": round(seconds, 1), "tail": tail}
        with out_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[{k}/{len(todo)}] {verdict:8} {seconds:5.1f}s {m.id}  {m.what}", flush=True)


def summary(out_path: Path) -> None:
    records = [json.loads(line) for line in out_path.read_text().splitlines() if line.strip()]
    files: dict[str, list[int]] = {}
    for r in records:
        counts = files.setdefault(r["path"], [0, 0])
        counts[r["verdict"] == "survived"] += 1
    print(f"{'file':32} {'mutants':>7} {'killed':>6} {'survived':>8}")
    for path, (killed, survived) in sorted(files.items()):
        print(f"{path:32} {killed + survived:7} {killed:6} {survived:8}")
    total_k = sum(k for k, _ in files.values())
    total_s = sum(s for _, s in files.values())
    print(f"{'total':32} {total_k + total_s:7} {total_k:6} {total_s:8}")
    print("\nsurvivors:")
    for r in records:
        if r["verdict"] == "survived":
            print(f"  {r['id']}  {r['what']}")


def show(m: Mutant) -> None:
    original = (REPO / m.path).read_text(encoding="utf-8").splitlines(keepends=True)
    sys.stdout.writelines(difflib.unified_diff(original, m.text.splitlines(keepends=True), m.path, m.id, n=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="files to mutate (default: every file in TARGETS)")
    parser.add_argument("--max", type=int, default=0, help="sample this many mutants (0: all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per test run (over: killed)")
    parser.add_argument("--out", type=Path, default=Path("mutation-results.jsonl"))
    parser.add_argument("--list", action="store_true", help="list the mutants, run nothing")
    parser.add_argument("--show", metavar="ID", help="print one mutant's diff")
    parser.add_argument("--only", metavar="ID", action="append", help="run these mutants (again), print verdicts")
    parser.add_argument("--summary", action="store_true", help="summarise --out")
    args = parser.parse_args()
    if args.summary:
        summary(args.out)
        return
    files = args.files or list(TARGETS)
    all_mutants = [m for path in files for m in mutants_of(path)]
    by_id = {m.id: m for m in all_mutants}
    for mid in [args.show or "", *(args.only or [])]:
        if mid and mid not in by_id:
            raise SystemExit(f"no mutant {mid!r} (see --list)")
    if args.show:
        show(by_id[args.show])
        return
    if args.only:
        copy = make_copy()
        try:
            for mid in args.only:
                m = by_id[mid]
                target = copy / m.path
                original = target.read_text(encoding="utf-8")
                target.write_text(m.text, encoding="utf-8")
                status, seconds, tail = run_tests(copy, TARGETS[m.path], args.timeout)
                target.write_text(original, encoding="utf-8")
                print(f"{'survived' if status == 'passed' else 'killed':8} {seconds:5.1f}s {mid}  {m.what}\n{tail}")
        finally:
            shutil.rmtree(copy.parent)
        return
    chosen = sample(all_mutants, args.max, args.seed)
    if args.list:
        for m in chosen:
            print(f"{m.id}  {m.what}")
        print(f"{len(chosen)} of {len(all_mutants)} mutants", file=sys.stderr)
        return
    copy = make_copy()
    try:
        for selection in {tuple(TARGETS[p]) for p in files}:
            status, seconds, tail = run_tests(copy, list(selection), args.timeout)
            print(f"baseline: {status} in {seconds:.1f}s\n{tail}", flush=True)
            if status != "passed":
                raise SystemExit("the unmutated tests do not pass; nothing to judge")
        run(chosen, args.out, args.timeout, copy)
    finally:
        shutil.rmtree(copy.parent)
    summary(args.out)


if __name__ == "__main__":
    main()

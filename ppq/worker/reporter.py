"""The reporter thread: sends finishes and errors in batches, and takes the next tasks in the reply."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import rpc
from ..errors import InvalidTaskError, MessageTooLargeError, PPQError
from .backoff import MAX_PAUSE, Backoff

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("ppq.worker")

# Most reports sent in one call.
MAX_REPORT_BATCH = 500


class Reporter:
    """Drains ``outbox`` (reports queued by the pool) to a master until the agent is done reporting."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.outbox: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        # Set by the agent once nothing more will be queued: the thread ends when the outbox is empty.
        self.done = threading.Event()
        self.backoff = Backoff(min(agent.max_sleep, MAX_PAUSE))

    def run(self) -> None:
        while True:
            try:
                first = self.outbox.get(timeout=0.5)
            except queue.Empty:
                if self.agent.stopping and self.done.is_set():
                    return
                continue
            batch = [first]
            while len(batch) < MAX_REPORT_BATCH:
                try:
                    batch.append(self.outbox.get_nowait())
                except queue.Empty:
                    break
            self.send(batch)

    def send(self, batch: list[dict[str, Any]]) -> None:
        """Send ``batch``, asking in the same call for as many tasks as the pool has room for."""
        agent, pool = self.agent, self.agent.pool
        self.backoff.reset()
        deadline = None
        while True:
            n = 0 if agent.stopping else pool.reserve(block=False)
            try:
                reply = agent.call("report", agent.light_info(), agent.queue_index, batch, n, 0)
            except InvalidTaskError as exc:
                pool.accept(n, [])
                if isinstance(exc, MessageTooLargeError) and len(batch) > 1:
                    # Large results: the batch goes in halves, each as large as one call carries.
                    half = len(batch) // 2
                    self.send(batch[:half])
                    self.send(batch[half:])
                    return
                if any(r.get("ok") or r.get("result_bytes") for r in batch):
                    # Refused for good: report plain failures instead, which carry nothing to refuse.
                    log.error("the master refused %d report(s) (%s); reporting them as failed", len(batch), exc)
                    batch = [{"id": r["id"], "lease": r["lease"], "ok": False, "retry": False,
                              "error": f"ReportRefusedError: {exc}"} if not r.get("release") else r
                             for r in batch]
                    continue
                log.error("the master refused %d report(s) (%s); their leases will expire and the tasks run "
                          "again", len(batch), exc)
                self.forget(batch)
                return
            except (PPQError, rpc.CommunicationError) as exc:
                pool.accept(n, [])
                if agent.stopping:
                    deadline = deadline or time.monotonic() + 10
                    if time.monotonic() > deadline:
                        log.error("could not report %d task(s) before stopping: %s; their leases will expire "
                                  "and they will run again", len(batch), exc)
                        self.forget(batch)
                        return
                agent.outage.failed(f"cannot report {len(batch)} result(s)", exc)
                time.sleep(self.backoff.pause)
                self.backoff.failed()
                continue
            agent.outage.ok()
            pool.accept(n, reply["tasks"])
            failed = reply.get("failed") or {}
            for report, ok in zip(batch, reply["accepted"], strict=True):
                if report.get("ok") or report.get("release"):
                    if not ok:
                        log.warning("task %s: report refused, the lease was lost (the task was requeued)",
                                    report["id"])
                    continue
                name = pool.failing.pop(report["id"], "")
                if not ok:
                    log.warning("task %s %s failed: %s; the report was refused, the lease was lost (the task "
                                "was requeued)", report["id"], name, one_line(report.get("error")))
                else:
                    log_failure(report["id"], name, report.get("error"), failed.get(report["id"]))
            return

    def forget(self, batch: list[dict[str, Any]]) -> None:
        for report in batch:
            self.agent.pool.failing.pop(report["id"], None)


def one_line(error: Any, longest: int = 300) -> str:
    """An error message as one line of the log (its first line, at most ``longest`` characters)."""
    lines = str(error or "").strip().splitlines() or [""]
    text = lines[0]
    if len(lines) > 1 or len(text) > longest:
        text = text[:longest] + "…"
    return text


def log_failure(task_id: str, name: str, error: Any, outcome: list[int] | None) -> None:
    """One line for a failed run: which attempt it was and what comes next (from the master's reply:
    ``[attempts failed, max_retry, seconds to the next run or -1]``, None for a cancelled task)."""
    if not isinstance(outcome, (list, tuple)) or len(outcome) != 3:
        log.info("task %s %s failed: %s; it was cancelled", task_id, name, one_line(error))
        return
    attempt, max_retry, next_in = outcome
    head = f"task {task_id} {name} failed (attempt {attempt} of {max_retry + 1}): {one_line(error)}"
    if next_in < 0:
        why = "no retries left" if attempt > max_retry else "not retried"
        log.warning("%s; %s: dead-listed", head, why)
    elif next_in == 0:
        log.info("%s; retrying now", head)
    else:
        log.info("%s; retrying in %ss", head, next_in)

"""The web dashboard in a real browser: headless Chromium driven by Selenium, against real
``ppq master``, ``ppq worker`` and ``ppq dashboard`` processes.

One master serves queue_index 0 (a worker runs its tasks) and 1 (no worker: what is pushed
there stays queued, so its counts are exact). Three dashboards read it: a plain one, one with
``auth_token`` set and a read-only one. Browser tests are skipped, with the reason, when
Chromium, its driver or Selenium is not installed (``.ci/run`` installs them where it can).

Every page is saved as a PNG at a desk's size and a phone's (SIZES) in
``test-artifacts/dashboard/<page>-<width>.png`` under the repository (PPQ_TEST_ARTIFACTS
elsewhere), each checked to be a page and not a blank, and no wider than the screen.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import psutil
import pytest

from ppq import PyroFunc
from ppq.config import load_config
from ppq.embedded import RedisServer, free_port
from ppq.errors import ConfigError
from ppq.stack import DEFAULT_QUICK_DEATH

from .conftest import REPO, Spawner, run_ppq, wait_for, wait_state

TOKEN = "dashboard-test-token"
# Where the screenshots go, and the screens they are taken at (a desk's, a phone's).
ARTIFACTS = Path(os.environ.get("PPQ_TEST_ARTIFACTS") or REPO / "test-artifacts") / "dashboard"
SIZES = ((1280, 800), (390, 844))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


def _browser_missing() -> str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if not CHROMIUM or not CHROMEDRIVER:
        return "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
    return ""


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """A plain GET (no redirects followed): (status, body)."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def http_call(url: str, method: str = "GET", path: str = "/", body: str = "", cookie: str = "",
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    """One request, no redirect followed: (status, headers with lower-case names, body)."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=15)
    try:
        sent = {"Cookie": f"ppq_dashboard={cookie}"} if cookie else {}
        if body:
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body.encode() if body else None, headers={**sent, **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
    finally:
        conn.close()


def session_of(url: str, path: str = "/signin", cookie: str = "") -> tuple[str, str]:
    """A page's session cookie (a new one unless ``cookie`` is given) and its CSRF token."""
    status, headers, body = http_call(url, path=path, cookie=cookie)
    given = headers.get("set-cookie", "")
    if given:
        cookie = given.split(";", 1)[0].split("=", 1)[1]
    marker = '<meta name="csrf" content="'
    return cookie, body[body.index(marker) + len(marker):].split('"', 1)[0]


class System:
    """The processes of this module: a master (restartable on its port), a worker, dashboards."""

    def __init__(self, spawn: Spawner, redis_a: RedisServer, redis_b: RedisServer, tmp: Path) -> None:
        self.spawn = spawn
        self.tmp = tmp
        self.redis = (redis_a.url, redis_b.url)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.master: subprocess.Popen[bytes] | None = None
        self.start_master()
        self.call = PyroFunc(self.address, timeout=5, retry=3)  # retried: the master is restarted once
        self.worker = spawn.worker(self.address, allow="tasks", concurrency=1)
        wait_for(lambda: self.call("server_info")[0]["workers"], what="the worker to register")

    def start_master(self) -> None:
        self.master = self.spawn("master", "--port", str(self.port), "--redis-map", f"0={self.redis[0]}",
                                 "--redis-map", f"1={self.redis[1]}", name="master")
        ping = PyroFunc(self.address, timeout=2, default_return=None)
        try:
            wait_for(lambda: self.master.poll() is not None or ping("ping") == "pong",  # type: ignore[union-attr]
                     what="the master")
        finally:
            ping.close()
        assert self.master.poll() is None, self.spawn.log(self.master)

    def dashboard(self, *args: str, env: dict[str, str] | None = None) -> str:
        """Start ``ppq dashboard`` on a free port; return its URL once it answers."""
        port = free_port()
        proc = self.spawn("dashboard", "-m", self.address, "--port", str(port), *args, env=env, name="dashboard")
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, self.spawn.log(proc)
            try:
                return get(url + "/static/dashboard.css")[0] == 200
            except OSError:
                return False

        wait_for(up, what="the dashboard")
        return url

    def dead_task(self, tag: str) -> tuple[str, Path]:
        """A task of queue_index 0 that failed for good (tasks.fail_until without its flag); its flag."""
        flag = self.tmp / f"flag-{tag}"
        tid = self.call("push_task", "fail_until", module="tasks", max_retry=0,
                        args=[str(flag), str(self.tmp / f"runs-{tag}"), tag])
        wait_state(self.call, tid, "dead")
        return tid, flag


@pytest.fixture(scope="module")
def system(redis_a: RedisServer, redis_b: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    import redis

    for url in (redis_a.url, redis_b.url):
        client = redis.Redis.from_url(url)
        client.flushall()
        client.close()
    tmp = tmp_path_factory.mktemp("dashboard")
    spawn = Spawner(tmp)
    try:
        s = System(spawn, redis_a, redis_b, tmp)
        s.plain = s.dashboard()  # type: ignore[attr-defined]
        yield s
        s.call.close()
    finally:
        spawn.cleanup()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = _browser_missing()
    if missing:
        pytest.skip(f"no browser for the dashboard tests: {missing}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser: Any) -> Any:
    """The browser with no cookies left from the test before."""
    browser.delete_all_cookies()
    return browser


def text_of(driver: Any, css: str) -> str:
    """The visible text of the first element ``css`` matches, read in one step in the page ("" when
    none does, or when the page is changing under the read: a poll's redraw, a navigation)."""
    from selenium.common.exceptions import WebDriverException

    try:
        return str(driver.execute_script(
            "var e = document.querySelector(arguments[0]); return e ? e.innerText : '';", css) or "")
    except WebDriverException:
        return ""


def shows(driver: Any, css: str, wanted: str, exact: bool = True) -> str:
    """Wait (a page may still be loading after a click) until ``css`` holds ``wanted``; its text."""
    def check() -> str:
        found = text_of(driver, css)
        return found if (found == wanted if exact else wanted in found) else ""

    return str(wait_for(check, timeout=10, interval=0.05, what=f"{css} to show {wanted!r}"))


def click(driver: Any, css: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, css).click()


def post(driver: Any, path: str, body: str) -> int:
    """A POST from the page (with its cookies), as a form would send it; its status."""
    return int(driver.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {method: 'POST', body: arguments[1], credentials: 'same-origin', redirect: 'manual',"
        " headers: {'Content-Type': 'application/x-www-form-urlencoded'}})"
        ".then(function (r) { done(r.status); }).catch(function () { done(-1); });", path, body))


def csrf_of(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.CSS_SELECTOR, "meta[name=csrf]").get_attribute("content"))


def not_blank(png: bytes, what: str) -> None:
    """The PNG decodes, and is a page: many colours, none over 99% of its pixels."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        rgb = image.convert("RGB")
    colours = rgb.getcolors(maxcolors=1 << 24) or []
    top = max(n for n, _ in colours) / (rgb.width * rgb.height)
    assert len(colours) >= 16 and top < 0.99, f"{what} looks blank: {len(colours)} colours, one on {top:.1%}"


def screenshots(driver: Any, name: str) -> list[Path]:
    """Save the whole page at each of SIZES as ``<name>-<width>.png``, checked; the page must fit the
    width (wide tables scroll in their box, the nav wraps). Back to the browser's size after."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    saved = []
    try:
        for width, height in SIZES:
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
            wait_for(lambda w=width: driver.execute_script("return window.innerWidth") == w, timeout=5,
                     what=f"the page laid out {width} wide")
            # The charts are drawn again at their new size (the script does it on resize).
            wait_for(lambda: driver.execute_script(
                "return Array.prototype.every.call(document.querySelectorAll('svg.chart'), function (s) {"
                "  return s.viewBox.baseVal.width === Math.max(200, Math.round(s.clientWidth)); })"),
                timeout=5, what="the charts drawn at the page's width")
            wide, tall = driver.execute_script("return [document.documentElement.scrollWidth, "
                                               "document.documentElement.scrollHeight]")
            assert wide <= width, f"{name} is {wide}px wide on a {width}px screen"
            # The whole page (up to 4000 px down), as one would scroll through it.
            shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": min(max(tall, height), 4000), "scale": 1}})
            png = base64.b64decode(shot["data"])
            path = ARTIFACTS / f"{name}-{width}.png"
            path.write_bytes(png)
            not_blank(png, str(path))
            saved.append(path)
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return saved


# -- pages -----------------------------------------------------------------------------------------


def test_overview_shows_the_counts_after_pushes_and_updates_them_live(system, page):
    base = int(system.call("server_info")[1]["queued"])
    for i in range(3):
        system.call("push_task", "add", module="tasks", args=[i, i], queue_index=1)
    page.get(system.plain + "/")
    cell = "tr[data-queue='1'] td[data-field='queued']"
    shows(page, cell, str(base + 3))  # shows(): the live part of the page is replaced at each poll
    shows(page, "tr[data-queue='0'] td[data-field='dead']", str(system.call("server_info")[0]["dead"]))
    # Pushed with the page open: the count changes without a reload (the page polls its JSON).
    system.call("push_tasks", [{"func": "add", "module": "tasks", "args": [1, 2], "queue_index": 1}] * 2)
    shows(page, cell, str(base + 5))
    assert page.find_element("id", "conn-lost").is_displayed() is False
    # The workers page lists the worker and what its control object says.
    system.call("wait_task", system.call("push_task", "add", module="tasks", args=[2, 3]), 0, 10)
    page.get(system.plain + "/workers")
    shows(page, "#workers", "tasks.add", exact=False)


def test_a_push_shows_on_the_open_overview_within_a_second_and_a_half(system, page):
    """Measured from before the push to the change of the page's DOM (a MutationObserver's clock
    is the machine's, as time.time() is), three times."""
    cell = "tr[data-queue='1'] td[data-field='queued']"
    page.get(system.plain + "/")
    shows(page, cell, str(system.call("server_info")[1]["queued"]))
    page.execute_script(
        "window.seen = []; var cell = arguments[0];"
        "new MutationObserver(function () {"
        "  var c = document.querySelector(cell); if (c) { window.seen.push([Date.now(), c.textContent]); }"
        "}).observe(document.getElementById('live'), {childList: true, subtree: true, characterData: true});",
        cell)
    delays = []
    for _ in range(3):
        expected = str(int(system.call("server_info")[1]["queued"]) + 1)
        pushed = time.time() * 1000
        system.call("push_task", "add", module="tasks", args=[1, 1], queue_index=1)
        seen = wait_for(lambda e=expected: [t for t, text in page.execute_script("return window.seen")
                                            if text == e], timeout=10, interval=0.05, what="the new count")
        delays.append((seen[0] - pushed) / 1000)
    assert statistics.median(delays) < 1.5 and max(delays) < 2.5, delays


def test_the_tasks_page_lists_each_state_a_page_at_a_time_with_a_function_filter(system, page):
    """queue_index 1 has no worker: what is pushed there stays queued (or delayed) as pushed."""
    before = int(system.call("server_info")[1]["queued"])
    mine = [system.call("push_task", "echo" if i % 3 == 0 else "add", module="tasks", args=[i, i], queue_index=1)
            for i in range(60)]
    later = system.call("push_task", "mul", module="tasks", args=[2, 3], queue_index=1, delay=3600)
    page.get(f"{system.plain}/tasks?q=1")
    assert text_of(page, "#states a.here").split() == ["queued", str(before + 60)]

    def listed() -> list[str]:
        return [str(r.get_attribute("data-id")) for r in page.find_elements("css selector", "#tasks tbody tr[data-id]")]

    # In lease order, 50 to a page: the first page ends with mine[:50 - before], the next goes on.
    first = listed()
    assert len(first) == 50 and first[before:] == mine[:50 - before]
    click(page, "#next")
    shows(page, "#page-note", "Tasks 51 to", exact=False)
    assert listed() == mine[50 - before:]
    # Filtered: only the page read is filtered, and says so.
    page.get(f"{system.plain}/tasks?q=1&func=tasks.echo")
    echoes = [tid for i, tid in enumerate(mine[:50 - before]) if i % 3 == 0]
    assert listed()[-len(echoes):] == echoes and all(t in mine or t not in mine for t in listed())
    assert all("tasks.echo" == r.text for r in page.find_elements("css selector", "#tasks tbody td:nth-child(2)"))
    assert "of the 50 read" in text_of(page, "#page-note") or "the 50 read" in text_of(page, "#page-note")
    page.get(f"{system.plain}/tasks?q=1&state=delayed")
    assert later in listed() and "tasks.mul" in text_of(page, f"tr[data-id='{later}']")
    tid, _ = system.dead_task("listed")
    page.get(f"{system.plain}/tasks?q=0&state=dead")
    assert listed()[0] == tid and "flag flag-listed is missing" in text_of(page, f"tr[data-id='{tid}']")
    # A task running on queue_index 0's worker.
    slow = system.call("push_task", "sleep_then", module="tasks", args=[3, "x"])
    wait_state(system.call, slow, "running")
    page.get(f"{system.plain}/tasks?q=0&state=running")
    assert slow in listed()
    # Bad arguments are a page naming them.
    status, body = get(f"{system.plain}/tasks?state=finished")
    assert status == 400 and "state must be one of" in body
    status, body = get(f"{system.plain}/tasks?offset=-5")
    assert status == 400 and "offset must be" in body
    system.call("purge_queue", 1)
    system.call("wait_task", slow, 0, 10)


def test_list_tasks_reads_priorities_first_then_push_order_and_only_the_page(system):
    """The master's list_tasks on queue_index 1 (no worker): priority 9, then 3, then 0, each in
    push order; a filter keeps the page's matches only; ``next`` goes on where the page ended."""
    system.call("purge_queue", 1)
    plain = [system.call("push_task", "add", module="tasks", args=[i, i], queue_index=1) for i in range(3)]
    high = system.call("push_task", "mul", module="tasks", args=[1, 1], queue_index=1, priority=9)
    mid = [system.call("push_task", "echo", module="tasks", args=[i], queue_index=1, priority=3) for i in range(2)]
    page = system.call("list_tasks", "queued", 1, 200, 0)
    assert [t["id"] for t in page["tasks"]] == [high, *mid, *plain]
    assert (page["total"], page["read"], page["next"]) == (6, 6, None)
    assert page["tasks"][0]["name"] == "tasks.mul" and page["tasks"][0]["priority"] == 9
    page = system.call("list_tasks", "queued", 1, 2, 2)
    assert [t["id"] for t in page["tasks"]] == [mid[1], plain[0]] and page["next"] == 4
    page = system.call("list_tasks", "queued", 1, 3, 2, "tasks.add")  # ids 2..4 read: two of them add
    assert [t["id"] for t in page["tasks"]] == plain[:2] and page["read"] == 3
    assert [t["id"] for t in system.call("list_tasks", "queued", 1, 50, 0, "echo")["tasks"]] == mid
    system.call("purge_queue", 1)


def test_the_workers_page_shows_p95_run_times(system, page):
    """tasks.record runs only here: twice for 50 ms, once for 300 ms (its p95, up to a bucket's 25% over)."""
    for seconds in (0.05, 0.05, 0.3):
        tid = system.call("push_task", "record", module="tasks", args=[str(system.tmp / "p95"), "x", seconds])
        system.call("wait_task", tid, 0, 10)
    page.get(system.plain + "/workers")
    shows(page, "#workers", "tasks.record", exact=False)
    mean = text_of(page, "div[data-func='tasks.record'] span[data-field='mean']")
    p95 = text_of(page, "div[data-func='tasks.record'] span[data-field='p95']")
    assert mean.endswith(" ms") and 130 <= float(mean.split()[0]) < 200, mean
    assert p95.endswith(" ms") and 300 <= float(p95.split()[0]) <= 400, p95


def test_a_failed_task_shows_its_traceback_and_requeue_from_the_dead_list_moves_it(system, page):
    tid, flag = system.dead_task("requeue")
    page.get(f"{system.plain}/tasks/0/{tid}")
    assert text_of(page, "#task-state") == "dead"
    traceback = text_of(page, "#task-traceback")
    assert "Traceback (most recent call last)" in traceback and "fail_until" in traceback
    assert "flag flag-requeue is missing" in text_of(page, "#task-error")
    flag.write_text("")  # the next run succeeds
    page.get(f"{system.plain}/dead/0")
    click(page, f"input[type=checkbox][value='{tid}']")
    click(page, "#requeue-chosen")
    # A confirmation first: nothing has moved yet.
    shows(page, "h1", "Requeue 1 dead task(s) of queue_index 0?", exact=False)
    assert system.call("get_task_info", tid)["state"] == "dead"
    click(page, "#confirm")
    shows(page, "#done", "Requeued 1 task(s).")
    assert tid not in text_of(page, "#dead")
    wait_state(system.call, tid, "done")
    page.get(f"{system.plain}/tasks/0/{tid}")
    assert text_of(page, "#task-state") == "done" and text_of(page, "#task-result") == '"requeue"'


def test_script_in_args_is_shown_as_text(system, page):
    payload = "<script>window.pwned = 1</script><img src=x onerror='window.pwned = 2'>"
    tid = system.call("push_task", "echo", module="tasks", args=[payload], queue_index=1)
    page.get(f"{system.plain}/tasks/1/{tid}")
    assert json.loads(text_of(page, "#task-args")) == [payload]
    assert page.execute_script("return window.pwned === undefined") is True
    status, body = get(f"{system.plain}/tasks/1/{tid}")
    assert status == 200 and "<script>window.pwned" not in body and "&lt;script&gt;" in body


def test_an_unknown_task_and_a_bad_id_are_pages_without_tracebacks(system):
    status, body = get(f"{system.plain}/tasks/0/{uuid.uuid4().hex}")
    assert status == 404 and "is unknown in queue_index 0" in body
    status, body = get(f"{system.plain}/tasks/0/bad%20id%3Cb%3E")
    assert status == 400 and "id must be a string" in body and "Traceback" not in body and "<b>" not in body
    status, body = get(f"{system.plain}/tasks/7/{uuid.uuid4().hex}")
    assert status == 400 and "queue_index" in body and "Traceback" not in body
    # A host name that is not loopback is refused on a loopback bind (DNS rebinding).
    assert get(system.plain + "/", {"Host": "evil.example:80"})[0] == 400


def test_schedules_and_limits_pages(system, page):
    system.call("schedule_add", {"name": "dash-tick", "every": 3600, "task": "tasks.add", "args": [1, 1],
                                 "queue_index": 1})
    system.call("limit_set", "tasks.mul", "5/s", None, 1)
    try:
        page.get(system.plain + "/schedules")
        row = "tr[data-name='dash-tick']"
        assert "tasks.add" in text_of(page, row) and "active" in text_of(page, row)
        click(page, f"{row} button[value='pause']")
        shows(page, "#done", "Schedule dash-tick paused.")
        assert "paused" in text_of(page, row)
        click(page, f"{row} button[value='run-now']")
        shows(page, "#done", "Schedule dash-tick pushed task s:dash-tick:", exact=False)
        page.get(system.plain + "/limits")
        assert "tasks.mul" in text_of(page, "#limits") and "5/s" in text_of(page, "#limits")
        page.get(system.plain + "/workflows")
        assert "No workflows yet" in text_of(page, "#no-workflows")
    finally:
        system.call("schedule_remove", "dash-tick", None)
        system.call("limit_remove", "tasks.mul", None, 1)


def test_a_pushed_chord_shows_as_a_tree(system, page):
    """A chord pushed on queue_index 1 (no worker: it stays as pushed) shows its group, the group's
    members and the callback, each a link to its task page."""
    add = {"func": "add", "module": "tasks", "args": [1, 2]}
    wid = system.call("push_workflow", {"chain": [add, {"chord": {"group": [add, add, add]}, "callback": add}]}, 1)
    page.get(f"{system.plain}/workflows?id={wid}&q=1")
    tree = text_of(page, "#workflow")
    assert tree.split()[0:2] == ["chain", wid], tree
    for kind in ("chord", "group"):
        assert kind in tree, tree
    links = [a.get_attribute("href") for a in page.find_elements("css selector", "#workflow a")]
    # chain, its first step, the chord, its group, three members and the callback: 8 nodes.
    assert len(links) == 8, links
    assert all("/tasks/1/" in link for link in links)
    info = system.call("get_task_info", wid, 1)
    assert [c["id"] for c in info["children"]] == [link.rsplit("/", 1)[1] for link in links[1:3]]


def test_every_page_is_saved_as_a_screenshot_at_a_desk_and_a_phone_width(system, page):
    """What an operator sees, kept as test artifacts: each page with something on it (a failed task,
    a schedule, a limit, a workflow's tree, tasks queued), at 1280x800 and 390x844."""
    tid, _ = system.dead_task("shot")
    for i in range(12):
        system.call("push_task", "echo" if i % 2 else "add", module="tasks", args=[i, i], queue_index=1)
    system.call("wait_task", system.call("push_task", "record", module="tasks",
                                         args=[str(system.tmp / "shot"), "x", 0.02]), 0, 10)
    system.call("schedule_add", {"name": "nightly-report", "cron": "0 3 * * *", "task": "tasks.add", "args": [1, 1],
                                 "queue_index": 1})
    system.call("limit_set", "tasks.mul", "5/s", 2, 1)
    add = {"func": "add", "module": "tasks", "args": [1, 2]}
    wid = system.call("push_workflow", {"chain": [add, {"chord": {"group": [add, add, add]}, "callback": add}]}, 1)
    try:
        saved = []
        page.get(system.plain + "/")
        wait_for(lambda: len(page.execute_script("return document.querySelectorAll('#chart-throughput path')")) >= 2,
                 timeout=15, what="the charts' lines")
        saved += screenshots(page, "overview")
        page.get(system.plain + "/workers")
        shows(page, "#workers", "tasks.record", exact=False)
        saved += screenshots(page, "workers")
        page.get(system.plain + "/tasks?q=1")
        saved += screenshots(page, "tasks")
        page.get(f"{system.plain}/tasks/0/{tid}")
        assert "Traceback" in text_of(page, "#task-traceback")
        saved += screenshots(page, "task")
        page.get(system.plain + "/dead/0")
        saved += screenshots(page, "dead")
        click(page, f"input[type=checkbox][value='{tid}']")
        click(page, "#requeue-chosen")
        shows(page, "h1", "Requeue 1 dead task(s)", exact=False)
        saved += screenshots(page, "confirm")
        page.get(system.plain + "/schedules")
        saved += screenshots(page, "schedules")
        page.get(system.plain + "/limits")
        saved += screenshots(page, "limits")
        page.get(f"{system.plain}/workflows?id={wid}&q=1")
        assert "chord" in text_of(page, "#workflow")
        saved += screenshots(page, "workflows")
        assert len(saved) == 18 and all(p.stat().st_size > 5000 for p in saved)
    finally:
        system.call("schedule_remove", "nightly-report", None)
        system.call("limit_remove", "tasks.mul", None, 1)
        system.call("purge_dead", [tid], 0)


# -- security ------------------------------------------------------------------------------------


def test_sign_in_with_auth_token_and_csrf(system, page):
    url = system.dashboard(env={"PPQ_AUTH_TOKEN": TOKEN})
    tid, _ = system.dead_task("auth")
    page.get(f"{url}/dead/0")
    assert page.current_url.startswith(f"{url}/signin")  # not signed in: sent to sign in
    screenshots(page, "signin")
    assert system.address not in page.page_source  # nothing of the system before sign-in
    assert get(f"{url}/api/overview")[0] == 401
    page.find_element("id", "token").send_keys("not-the-token")
    click(page, "#signin")
    shows(page, "#refused", "not the right one", exact=False)
    page.find_element("id", "token").send_keys(TOKEN)
    click(page, "#signin")
    wait_for(lambda: page.current_url == f"{url}/dead/0", timeout=10, what="back where it was going")
    assert tid in text_of(page, "#dead")
    cookie = page.get_cookie("ppq_dashboard")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    # A POST without the form's CSRF token is refused, and changes nothing; with it, it goes on.
    assert post(page, "/dead/0/act", f"action=requeue&confirm=1&id={tid}") == 403
    assert post(page, "/dead/0/act", f"action=requeue&confirm=1&id={tid}&csrf=forged") == 403
    assert system.call("get_task_info", tid)["state"] == "dead"
    assert post(page, "/dead/0/act", f"action=purge&confirm=1&id={tid}&csrf={csrf_of(page)}") in (0, 303)
    assert system.call("get_task_info", tid) is None
    # A body larger than the bound is refused before it is read.
    assert post(page, "/dead/0/act", "csrf=" + "x" * 100_000) == 413
    # Wrong tokens: ten a minute from one address (the one above among them), then even the right one waits.
    form = f"csrf={csrf_of(page)}&next=/&token="
    assert [post(page, "/signin", form + "wrong") for _ in range(9)] == [403] * 9
    assert post(page, "/signin", form + TOKEN) == 429


def test_read_only_hides_and_refuses_actions(system, page):
    url = system.dashboard("--read-only")
    tid, _ = system.dead_task("readonly")
    page.get(f"{url}/dead/0")
    assert tid in text_of(page, "#dead")
    assert not page.find_elements("css selector", "#requeue-chosen, #requeue-all, #purge-all, input[type=checkbox]")
    page.get(f"{url}/tasks/0/{tid}")
    assert text_of(page, "#task-state") == "dead" and not page.find_elements("css selector", "form.actions")
    assert post(page, "/dead/0/act", f"action=requeue&confirm=1&id={tid}&csrf={csrf_of(page)}") == 403
    assert system.call("get_task_info", tid)["state"] == "dead"


def test_a_non_loopback_bind_without_a_token_is_refused():
    out = run_ppq("dashboard", "--host", "0.0.0.0", "--port", str(free_port()), timeout=30)
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "dashboard.host" in line and "auth_token" in line
    with pytest.raises(ConfigError, match="dashboard.port: not a port number"):
        load_config(overrides={"dashboard.port": 70000}, environ={})
    with pytest.raises(ConfigError, match="dashboard.read_only: expected true or false"):
        load_config(overrides={"dashboard.read_only": "maybe"}, environ={})


# -- failing over --------------------------------------------------------------------------------


def test_the_connection_lost_banner_shows_while_no_master_answers(system, page):
    page.get(system.plain + "/")
    banner = page.find_element("id", "conn-lost")
    assert not banner.is_displayed()
    assert system.master is not None
    system.master.send_signal(signal.SIGKILL)
    system.master.wait(10)
    wait_for(banner.is_displayed, timeout=15, what="the connection-lost banner")
    lost = "return document.body.classList.contains('lost')"
    assert page.execute_script(lost) is True  # the last figures read, dimmed
    screenshots(page, "connection-lost")
    system.start_master()
    wait_for(lambda: not banner.is_displayed(), timeout=15, what="the banner to clear")
    assert page.execute_script(lost) is False
    system.call("push_task", "add", module="tasks", args=[0, 0], queue_index=1)
    expected = str(system.call("server_info")[1]["queued"])
    shows(page, "tr[data-queue='1'] td[data-field='queued']", expected)


# -- ppq up --------------------------------------------------------------------------------------


def test_ppq_up_prints_the_dashboard_url_and_goes_on_without_it_when_its_port_is_taken_or_a_library_missing(
        tmp_path):

    from .conftest import ppq_command, ppq_env

    def up(*args: str, pythonpath: str = "") -> tuple[subprocess.Popen[str], str]:
        log = tmp_path / f"up-{uuid.uuid4().hex[:6]}.log"
        env = ppq_env({"PPQ_DASHBOARD_PORT": str(port)})
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join([pythonpath, env["PYTHONPATH"]])
        with open(log, "w") as out:
            proc = subprocess.Popen([*ppq_command(), "up", "--workers", "0", "--port", "0", "--data-dir",
                                     str(tmp_path / "data"), *args], stdout=out, stderr=subprocess.STDOUT,
                                    env=env, stdin=subprocess.DEVNULL)
        wait_for(lambda: proc.poll() is not None or "Push with" in log.read_text(), timeout=30, what="ppq up")
        return proc, str(log)  # type: ignore[return-value]

    port = free_port()
    proc, log = up()
    try:
        assert f"dashboard: http://127.0.0.1:{port}/\n" in Path(log).read_text()
        wait_for(lambda: "dashboard ready" in Path(log).read_text(), timeout=20, what="the dashboard")
        assert get(f"http://127.0.0.1:{port}/")[0] == 200
        # Supervised like a worker: killed after its first seconds, it is started again.
        (child,) = [p for p in psutil.Process(proc.pid).children() if "dashboard" in p.cmdline()]
        wait_for(lambda: time.time() - child.create_time() > DEFAULT_QUICK_DEATH + 0.5, timeout=15,
                 what="the dashboard to have run its first seconds")
        child.kill()
        wait_for(lambda: f"the dashboard (pid {child.pid}) exited with -9; starting another" in Path(log).read_text(),
                 timeout=10, what="the dashboard to be started again")
        wait_for(lambda: not get_refused(port) and get(f"http://127.0.0.1:{port}/")[0] == 200, timeout=20,
                 what="the new dashboard to answer")
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, Path(log).read_text()
    assert get_refused(port)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen(1)
        proc, log = up()
        try:
            text = Path(log).read_text()
            assert f"dashboard off: cannot listen on 127.0.0.1:{port}" in text and "dashboard: http" not in text
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0, Path(log).read_text()
    proc, log = up("--no-dashboard")
    try:
        assert "dashboard" not in Path(log).read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, Path(log).read_text()
    # Where starlette cannot be imported (a sitecustomize hides it), one line, and the stack runs.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'starlette':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n")
    proc, log = up(pythonpath=str(hide))
    try:
        lines = [line for line in Path(log).read_text().splitlines() if "dashboard" in line]
        assert len(lines) == 1 and "dashboard off: starlette not installed" in lines[0], lines
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, Path(log).read_text()


def get_refused(port: int) -> bool:
    try:
        get(f"http://127.0.0.1:{port}/")
    except OSError:
        return True
    return False


def test_env_port_reaches_the_config():
    config = load_config(environ={"PPQ_DASHBOARD_PORT": "7681", "PPQ_DASHBOARD_HOST": "::1"})
    assert (config.dashboard.port, config.dashboard.host, config.dashboard.read_only) == (7681, "::1", False)


def test_a_workflow_tree_renders_nested_and_escaped():
    """The workflows page's template, given a tree as Source.workflow builds it from records with
    ``kind`` and ``children`` (the fields a workflow's records carry)."""
    from ppq.dashboard.data import Source
    from ppq.dashboard.security import Sessions
    from ppq.dashboard.views import Views

    source = Source(load_config(environ={}), ["127.0.0.1:1"])
    try:
        views = Views(source, Sessions(None), False, "127.0.0.1")

        def leaf(tid: str, state: str) -> dict[str, Any]:
            return {"info": {"id": tid, "state": state, "module": "tasks", "func": "add"}, "children": [], "more": 0}

        group = {"info": {"id": "g1", "state": "running", "kind": "group"},
                 "children": [leaf("b1", "running"), leaf("<script>x</script>", "queued")], "more": 3}
        tree = {"info": {"id": "c1", "state": "running", "kind": "chain"}, "children": [leaf("a1", "done"), group],
                "more": 0}
        html = views.templates.get_template("workflows.html").render(
            path="/workflows", read_only=False, csrf="", signed_in=False, authed=True, masters=[], lost=False,
            message="", tree=tree, qi=0, task_id="c1")
    finally:
        source.close()
    body = html[html.index('id="workflow"'):]
    order = [body.index(text) for text in ("chain", "a1", "group", "b1", "&lt;script&gt;x&lt;/script&gt;",
                                           "and 3 more")]
    assert order == sorted(order)
    assert "<script>x" not in html
    assert body.count("<ul>") == 2  # the chain's children, and the group's inside them


# -- red team: the dashboard's own pages -------------------------------------------------------------

XSS = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'


def test_every_post_needs_its_own_session_csrf_token_and_changes_nothing_without_it(system):
    system.call("schedule_add", {"name": "csrf-tick", "every": 3600, "task": "tasks.add", "queue_index": 1})
    tid, _ = system.dead_task("csrf")
    try:
        cookie, csrf = session_of(system.plain, "/schedules")
        _, other_csrf = session_of(system.plain, "/schedules")  # another session's token
        assert csrf and other_csrf and csrf != other_csrf
        posts = [("/schedules/act", "action=pause&name=csrf-tick&queue_index=1"),
                 ("/dead/0/act", f"action=purge&confirm=1&id={tid}"), ("/signout", ""), ("/signin", "token=x")]
        for path, form in posts:
            for extra in ("", "&csrf=", f"&csrf={other_csrf}", "&csrf=" + "A" * 43):
                status, _, body = http_call(system.plain, "POST", path, (form + extra).lstrip("&"), cookie)
                assert status == 403 and "CSRF" in body, (path, extra, status)
        assert not system.call("schedule_list", 1)[0].get("paused")
        assert system.call("get_task_info", tid)["state"] == "dead"
        # With the right one, it goes through.
        assert http_call(system.plain, "POST", "/schedules/act", posts[0][1] + f"&csrf={csrf}", cookie)[0] == 303
        assert [s["paused"] for s in system.call("schedule_list", 1) if s["name"] == "csrf-tick"] == [True]
    finally:
        system.call("schedule_remove", "csrf-tick", None)
        system.call("purge_dead", [tid], 0)


def test_sign_in_makes_a_new_session_sign_out_ends_it_and_next_stays_on_the_site(system):
    url = system.dashboard(env={"PPQ_AUTH_TOKEN": TOKEN})
    before, csrf = session_of(url)
    status, headers, _ = http_call(url, "POST", "/signin", f"csrf={csrf}&next=/limits&token={TOKEN}", before)
    assert status == 303 and headers["location"] == "/limits"
    after = headers["set-cookie"].split(";", 1)[0].split("=", 1)[1]
    assert after != before  # a session fixed before sign-in is not the one signed in
    assert http_call(url, path="/limits", cookie=before)[0] == 303  # still sent to sign in
    assert http_call(url, path="/limits", cookie=after)[0] == 200
    _, csrf_after = session_of(url, "/limits", after)
    status, headers, _ = http_call(url, "POST", "/signout", f"csrf={csrf_after}", after)
    assert status == 303 and 'ppq_dashboard=""' in headers["set-cookie"]
    # The cookie, replayed after sign-out (a copy kept elsewhere), signs in no one.
    status, headers, _ = http_call(url, path="/limits", cookie=after)
    assert status == 303 and headers["location"].startswith("/signin")
    # Sign-in's next= leads to a path of this site only, whatever it is given.
    for evil in ("//evil.example/", "/\\evil.example/", "/\t/evil.example/", "/\n/evil", "https://evil.example/",
                 "javascript:alert(1)", "/\r\nSet-Cookie: x=1", " /x", "\\\\evil.example"):
        status, headers, _ = http_call(system.plain, path="/signin?" + urlencode({"next": evil}))
        assert status == 303 and headers["location"] == "/", (evil, headers.get("location"))
    status, headers, _ = http_call(system.plain, path="/signin?" + urlencode({"next": "/dead/0?page=2"}))
    assert headers["location"] == "/dead/0?page=2"
    cookie, csrf = session_of(url)
    status, headers, _ = http_call(url, "POST", "/signin", urlencode({"csrf": csrf, "next": "/\t/evil.example",
                                                                      "token": TOKEN}), cookie)
    assert status == 303 and headers["location"] == "/"


def test_what_tasks_and_workers_send_is_shown_as_text_on_every_page(system, page):
    """Error, traceback and args of a task, a worker's host and id, as a task or a worker could
    send them; func, module and schedule names are refused with such characters."""
    tid = system.call("push_task", "boom", module="tasks", args=[XSS], max_retry=0)
    wait_state(system.call, tid, "dead")
    worker = {"id": "xss<b>worker", "host": XSS, "pid": 1, "concurrency": 1, "running": [], "done": 0, "failed": 0,
              "control_uri": "", "heartbeat_interval": 30}
    system.call("heartbeat", worker, 1, [])
    for bad in ({"func": XSS}, {"func": "add", "module": XSS}):
        with pytest.raises(Exception, match="func|module"):
            system.call("push_task", **{"module": "tasks", **bad})
    with pytest.raises(Exception, match="name"):
        system.call("schedule_add", {"name": XSS, "every": 60, "task": "tasks.add"})
    try:
        cookie, _ = session_of(system.plain, "/")
        for path in ("/", "/api/overview", "/workers", "/api/workers", "/tasks?q=0&state=dead", f"/tasks/0/{tid}",
                     "/dead/0", f"/workflows?id={tid}&q=0", "/tasks?q=1&func=" + quote(XSS)):
            status, _, body = http_call(system.plain, path=path, cookie=cookie)
            text = json.loads(body).get("html", "") if path.startswith("/api/") else body
            assert status in (200, 400) and "<script>window.pwned" not in text and "<img src=x" not in text, path
        for path in ("/workers", f"/tasks/0/{tid}", "/dead/0"):
            page.get(system.plain + path)
            shows(page, "main", "window.pwned = 1", exact=False)  # there, as text
            assert page.execute_script("return window.pwned === undefined") is True, path
    finally:
        system.call("release_worker", worker, 1, True)
        system.call("purge_dead", [tid], 0)


def test_long_addresses_and_slow_clients_are_cut_off(system):
    port = int(system.plain.rsplit(":", 1)[1])
    # Two clients that trickle their request, a byte at a time (each byte would reset uvicorn's own
    # keep-alive timeout): one its headers, one its form's body. Both are closed after
    # REQUEST_READ_TIMEOUT (10 s).
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        slow[0].sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        slow[1].sendall(b"POST /signin HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n"
                        b"Content-Type: application/x-www-form-urlencoded\r\n\r\ntoken=")
        opened = time.monotonic()
        status, _, body = http_call(system.plain, path="/tasks?func=" + "a" * 100_000)
        assert status == 414 and "too long" in body
        status, _, body = http_call(system.plain, path="/tasks?func=" + "a" * 5_000)
        assert status == 400 and "func must be at most 200" in body
        status, _, body = http_call(system.plain, path="/", headers={"X-Junk": "j" * 40_000})
        assert status == 431 and "headers take more than" in body
        closed: dict[int, float] = {}
        for sock in slow:
            sock.settimeout(0.05)
        while len(closed) < 2 and time.monotonic() - opened < 20:
            for i, sock in enumerate(slow):
                if i in closed:
                    continue
                try:
                    sock.sendall(b"x")
                    if sock.recv(1024) == b"":
                        closed[i] = time.monotonic() - opened
                except TimeoutError:
                    pass
                except OSError:
                    closed[i] = time.monotonic() - opened
            time.sleep(0.2)  # the trickle's pace
        assert sorted(closed) == [0, 1] and all(9 <= t < 15 for t in closed.values()), closed
    finally:
        for sock in slow:
            sock.close()
    assert get(system.plain + "/static/dashboard.css")[0] == 200


def test_the_listening_socket_gives_connections_without_nagle():
    """asyncio sets TCP_NODELAY only where the socket's proto says TCP: else each kept-alive request
    waits for the client's delayed ACK (40 ms) between the reply's headers and its body."""
    from ppq.dashboard.app import listen

    sock = listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        client = socket.create_connection(sock.getsockname())
        accepted, _ = sock.accept()
        assert accepted.proto == socket.IPPROTO_TCP
        accepted.close()
        client.close()
    finally:
        sock.close()


def test_a_worker_keeps_p95_per_function_in_fixed_memory():
    """The workers page's p95 comes from each function's log-histogram (ppq/worker/stats.py): a fixed
    list of ints per function, counted into without allocating; its quantile is the top of the bucket
    holding it, at most 25% over."""
    import tracemalloc

    from ppq.worker.stats import BUCKETS, FuncStats, bucket_of, bucket_top

    stats = FuncStats()
    for ms in range(1, 101):  # 1..100 ms, once each
        stats.observe(ms / 1000)
    assert 0.095 <= stats.quantile(0.95) <= 0.095 * 1.25
    assert 0.050 <= stats.quantile(0.5) <= 0.050 * 1.25
    assert stats.as_dict()["p95_time"] == stats.quantile(0.95) and stats.as_dict()["count"] == 100
    for seconds in (1e-7, 2**-16, 0.3, 1.0, 7.5, 3600.0, 1e9):
        index = bucket_of(seconds)
        assert index == 0 or bucket_top(index - 1) <= seconds
        assert index == BUCKETS - 1 or seconds < bucket_top(index)
    assert bucket_of(0.0) == bucket_of(-1.0) == 0 and bucket_of(float("nan")) == 0
    assert FuncStats().quantile(0.95) == 0.0
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            stats.observe(0.001 * (i % 500))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 1024 and len(stats.histogram) == BUCKETS and stats.count == 20_100

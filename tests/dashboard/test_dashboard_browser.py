"""A real browser (Debian chromium driven by Playwright) on the dashboard of a live federation:
the round number and the charts render, the download link returns the adapter, no request
leaves the machine; a screenshot is saved (also to ``$FEDROT_DASHBOARD_SCREENSHOT`` when set,
which is how ``docs/img/dashboard.png`` is made). And on a recorded instruction-tuning run
(the standalone dashboard): the exact-match and perplexity charts and columns."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Route, sync_playwright

from dashboard_state import INSTRUCT_EVALUATION, record_instruction_run
from live_federation import (
    LiveServer,
    close_clients,
    get,
    live_settings,
    make_clients,
    refused_upload,
    train_and_upload,
    wait_for,
)
from wire import WireClient

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking"]  # fmt: skip
ROUNDS = 4
LAST = ROUNDS - 1

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian chromium is not installed (make test installs it)"
)


async def take_part(client: WireClient, index: int) -> None:
    """Rounds 0 .. LAST - 1 in full; in round LAST only client 0 reports (the others keep
    training), so the page shows a round in progress."""
    await client.enroll(host=f"node-{index}")
    while True:
        response = await client.get_task(max_wait_s=2.0)
        if response.WhichOneof("task") != "train":
            continue
        task = response.train
        if task.round == LAST and index > 0:
            return
        await train_and_upload(client, task, index, loss=1.2 / (1 + task.round) + 0.1 * index)
        if task.round == LAST:
            return


async def federation(address: str) -> list[WireClient]:
    clients = await make_clients(address)
    await asyncio.gather(*(take_part(c, i) for i, c in enumerate(clients)))
    await refused_upload(clients[2])
    return clients


@pytest.fixture
def server(tmp_path: Path) -> LiveServer:
    live = LiveServer(live_settings(tmp_path, min_clients=3, rounds=ROUNDS, round_deadline_s=600.0))
    yield live
    live.stop()


def test_dashboard_in_a_real_browser(server: LiveServer, tmp_path: Path) -> None:
    clients = server.call(federation(server.address))
    wait_for(lambda: get(server, "/api/v1/runs/current")["clients_reported"] == 1, "round 3's report")
    latest = get(server, "/api/v1/runs/current/adapters/latest")
    outside: list[str] = []
    script_errors: list[str] = []

    def local_only(route: Route) -> None:
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda error: script_errors.append(str(error)))
            page.route("**/*", local_only)
            page.goto(server.url + "/")
            page.wait_for_function(f"document.getElementById('round-number').textContent === '{LAST}'")
            page.wait_for_selector("#chart-loss .main-svg")
            page.wait_for_function("document.querySelectorAll('#chart-error .scatterlayer .point').length >= 3")
            assert page.locator("#clients tbody tr").count() == 3
            assert "refused" in page.locator("#clients tbody").inner_text()
            assert page.locator("#countdown").inner_text().endswith("left")
            assert page.locator("#admin").is_visible()  # a live run: the admin actions are offered
            assert page.locator("#chart-loss .g-y2title").text_content() == "accuracy"
            assert page.locator("#chart-perplexity").is_hidden()  # classification: no perplexity
            assert page.locator("#col-accuracy").is_visible() and page.locator("#col-exact_match").is_hidden()
            link = page.locator("a.download-safetensors").first
            assert link.get_attribute("data-sha256") == latest["sha256"]
            weights = page.request.get(server.url + link.get_attribute("href"))
            assert weights.ok and hashlib.sha256(weights.body()).hexdigest() == latest["sha256"]
            archive = page.request.get(server.url + page.locator("a.download-zip").first.get_attribute("href"))
            assert archive.ok and archive.body()[:2] == b"PK"
            shot = page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    assert not outside, f"the page asked for outside resources: {outside}"
    assert not script_errors, f"the page's script failed: {script_errors}"
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    if target := os.environ.get("FEDROT_DASHBOARD_SCREENSHOT"):
        Path(target).write_bytes(shot)
    server.call(close_clients(clients))


@contextmanager
def standalone_dashboard(state_dir: Path) -> Iterator[str]:
    """``python -m fedrot_server.dashboard`` over ``state_dir`` on port 0; yields its URL."""
    command = [sys.executable, "-m", "fedrot_server.dashboard", "--state-dir", str(state_dir),
               "--listen", "127.0.0.1:0"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        found = re.search(r"dashboard on port (\d+)", line)
        assert found, line
        yield f"http://127.0.0.1:{found.group(1)}"
    finally:
        process.terminate()
        process.wait(30)
        process.stderr.close()


def test_exact_match_and_perplexity_of_an_instruction_run(tmp_path: Path) -> None:
    """Rounds reporting exact match: its line on the [0, 1] quality axis, perplexity in its own
    chart, and the rounds table with exact match (percent) and perplexity but no accuracy."""
    run = record_instruction_run(tmp_path / "state")
    exact, perplexity = (list(v) for v in zip(*INSTRUCT_EVALUATION, strict=True))
    script_errors: list[str] = []
    with standalone_dashboard(run.state_dir) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda error: script_errors.append(str(error)))
            page.goto(url + "/")
            page.wait_for_function("document.querySelectorAll('#chart-perplexity .scatterlayer .point').length === 3")
            loss = page.evaluate("(({data, layout}) => ({traces: data.map((t) => [t.name, t.y]), "
                                 "range: layout.yaxis2.range}))(document.getElementById('chart-loss'))")
            assert loss == {"traces": [["train loss", [2.0, 1.5, 1.0]], ["held-out exact match", exact]],
                            "range": [0, 1]}  # fmt: skip
            assert page.locator("#chart-loss .scatterlayer .trace").nth(1).locator(".point").count() == 3
            assert page.locator("#chart-loss .g-y2title").text_content() == "exact match"
            assert page.locator("#chart-perplexity .g-ytitle").text_content() == "perplexity"
            assert page.evaluate("document.getElementById('chart-perplexity').data[0].y") == perplexity
            headers = page.locator("#rounds thead th:visible").all_inner_texts()
            assert "exact match" in headers and "perplexity" in headers and "accuracy" not in headers
            last = page.locator("#rounds tbody tr").nth(2).locator("td").all_inner_texts()
            assert len(last) == len(headers) and "50.0 %" in last and "6.250" in last
        finally:
            browser.close()
    assert not script_errors, f"the page's script failed: {script_errors}"

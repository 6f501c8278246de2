"""A real browser (Debian chromium driven by Playwright) on the dashboard of a live federation:
the round number and the charts render, the download link returns the adapter, no request
leaves the machine. On a recorded instruction-tuning run (the standalone dashboard): the
exact-match and perplexity charts and columns. On two recorded runs behind a read token (the
standalone dashboard): signing in, the runs page and switching runs, the module round selector,
percentages, nodes kept across polls, the 390 px layout; its screenshot is saved to
``$FEDROT_DASHBOARD_SCREENSHOT`` when set, which is how ``docs/img/dashboard.png`` is made."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page, Route, sync_playwright

from dashboard_state import (
    INSTRUCT_EVALUATION,
    INSTRUCT_RUN,
    SHOWCASE_ROUNDS,
    SHOWCASE_RUN,
    record_instruction_run,
    record_showcase_run,
)
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
            page.wait_for_function(f"document.getElementById('round-number').textContent === '{LAST + 1}'")
            page.wait_for_selector("#chart-loss .main-svg")
            page.wait_for_function("document.querySelectorAll('#chart-error .scatterlayer .point').length >= 3")
            assert page.locator("#clients tbody tr").count() == 3
            assert "refused" in page.locator("#clients tbody").inner_text()
            assert page.locator("#countdown").inner_text().endswith("left")
            assert page.locator("#admin").is_visible()  # a live run: the admin actions are offered
            assert page.locator("#round-total").inner_text() == str(ROUNDS)
            assert page.locator("#chart-loss .g-y2title").text_content() == "accuracy (%)"
            assert page.locator("#chart-perplexity").is_hidden()  # classification: no perplexity
            headers = page.locator("#rounds thead th").all_inner_texts()
            assert "accuracy" in headers and "exact match" not in headers
            link = page.locator("a.download-safetensors").first
            assert "token" not in link.get_attribute("href")
            assert link.get_attribute("data-sha256") == latest["sha256"]
            weights = page.request.get(server.url + link.get_attribute("href"))
            assert weights.ok and hashlib.sha256(weights.body()).hexdigest() == latest["sha256"]
            archive = page.request.get(server.url + page.locator("a.download-zip").first.get_attribute("href"))
            assert archive.ok and archive.body()[:2] == b"PK"
        finally:
            browser.close()
    assert not outside, f"the page asked for outside resources: {outside}"
    assert not script_errors, f"the page's script failed: {script_errors}"
    server.call(close_clients(clients))


@contextmanager
def standalone_dashboard(state_dir: Path, *options: str) -> Iterator[str]:
    """``python -m fedrot_server.dashboard`` over ``state_dir`` on port 0; yields its URL."""
    command = [sys.executable, "-m", "fedrot_server.dashboard", "--state-dir", str(state_dir),
               "--listen", "127.0.0.1:0", *options]  # fmt: skip
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
            assert page.locator("#chart-loss .g-y2title").text_content() == "exact match (%)"
            assert page.locator("#chart-perplexity .g-ytitle").text_content() == "perplexity (per token)"
            assert page.evaluate("document.getElementById('chart-perplexity').data[0].y") == perplexity
            headers = page.locator("#rounds thead th:visible").all_inner_texts()
            assert "exact match" in headers and "perplexity" in headers and "accuracy" not in headers
            last = page.locator("#rounds tbody tr").nth(2).locator("td").all_inner_texts()
            assert len(last) == len(headers) and "50.0 %" in last and "6.250" in last
        finally:
            browser.close()
    assert not script_errors, f"the page's script failed: {script_errors}"


READ = "read-token-for-the-browser-0123"
NO_PAGE_SCROLL = "document.documentElement.scrollWidth <= window.innerWidth"


def text(page: Page, selector: str) -> str:
    return page.locator(selector).inner_text()


def sign_in_and_check_the_run_page(page: Page, url: str) -> None:
    """Sign in with the read token (the box goes away), then the showcase run: round 7 of 8,
    training, accuracy as percentages, labelled error axes."""
    page.goto(url + "/")
    page.locator("#read-token").fill(READ)
    page.locator("#read-token-save").click()
    page.wait_for_function("document.getElementById('round-number').textContent === '7'")
    assert page.locator("#login").is_hidden()
    assert text(page, "#round-total") == str(SHOWCASE_ROUNDS)
    assert text(page, "#round-stage") == "training: 2 of 3 clients reported"
    assert text(page, "#countdown").endswith("left") and text(page, "#eta").startswith("≈")
    assert text(page, "#best") == "accuracy 67.2 % (round 6)"
    page.wait_for_selector("#rounds tbody tr >> nth=6")
    first = page.locator("#rounds tbody tr").first.locator("td").all_inner_texts()
    assert first[:2] == ["1", "closed"] and "36.2 %" in first and "55.0 %" in first  # drift share
    assert "FedIT error (same uploads)" in page.locator("#rounds thead th").all_inner_texts()
    page.wait_for_selector("#chart-error .main-svg")
    assert page.evaluate("document.getElementById('chart-loss').layout.yaxis2.tickformat") == ".0%"
    assert page.locator("#chart-error .g-ytitle").text_content() == "absolute error (Frobenius norm)"
    assert page.locator("#chart-error .g-y2title").text_content().startswith("relative error")
    assert page.locator("#admin").is_hidden()  # no admin token and no live run here


def check_nodes_survive_polls(page: Page) -> None:
    """A selected SHA-256 stays selected, in the same node, across two polls."""
    page.evaluate("""() => {
        window.shaCell = document.querySelector('#adapters tbody td.sha');
        getSelection().selectAllChildren(window.shaCell);
    }""")
    for _ in range(2):
        with page.expect_response(lambda r: r.url.endswith("/adapters")):
            pass
    assert page.evaluate("document.querySelector('#adapters tbody td.sha') === window.shaCell")
    assert page.evaluate("getSelection().toString()") == page.locator("#adapters tbody td.sha").first.inner_text()


def check_downloads_need_no_token_in_the_url(page: Page, url: str) -> None:
    link = page.locator("a.download-safetensors").first
    href = link.get_attribute("href")
    assert "token" not in href
    weights = page.request.get(url + href)  # the session cookie of the page's context
    assert weights.ok and hashlib.sha256(weights.body()).hexdigest() == link.get_attribute("data-sha256")
    assert page.request.head(url + href).ok


def check_module_round_selector(page: Page) -> None:
    with page.expect_request(lambda r: "/modules?round=2" in r.url):
        page.locator("#module-round").select_option("2")
    page.wait_for_function("document.getElementById('chart-modules').layout?.title?.text?.startsWith('Per module, round 3')")
    page.wait_for_timeout(2500)  # a poll later, the round chosen is still shown
    assert page.locator("#module-round").input_value() == "2"
    assert page.evaluate("document.getElementById('chart-modules').layout.title.text").startswith("Per module, round 3")


def check_runs_page_and_switching(page: Page) -> None:
    page.evaluate("window.notReloaded = true")
    page.locator("#nav-runs").click()
    page.wait_for_selector("#runs tbody tr >> nth=1")
    rows = [r.locator("td").all_inner_texts() for r in page.locator("#runs tbody tr").all()]
    assert [r[:2] for r in rows] == [[SHOWCASE_RUN, "running"], [INSTRUCT_RUN, "finished"]]
    assert rows[1][2:6] == ["fedrot", "0.4", "3 / 3", "exact match 50.0 % (round 3)"]
    assert page.locator("#run-view").is_hidden()
    page.locator(f"#runs a.run-link:text('{INSTRUCT_RUN}')").click()
    page.wait_for_function(f"document.getElementById('run-id').textContent === '{INSTRUCT_RUN}'")
    page.wait_for_function("document.querySelectorAll('#rounds tbody tr').length === 3")
    assert page.evaluate("window.notReloaded") and f"run={INSTRUCT_RUN}" in page.url
    assert text(page, "#round-number") == "3" and text(page, "#stage") == "finished"
    assert page.locator("#adapters tbody tr").count() == 4  # a finished run: still downloadable
    assert page.locator("#chart-modules .chart-empty").is_visible()  # no report: no axes
    assert page.locator("#chart-modules .main-svg").count() == 0
    page.go_back()
    page.wait_for_selector("#runs-view:not([hidden])")
    page.go_back()
    page.wait_for_function(f"document.getElementById('run-id').textContent === '{SHOWCASE_RUN}'")
    assert page.evaluate("window.notReloaded")


def check_narrow_layout(page: Page) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_function(NO_PAGE_SCROLL)
    page.wait_for_timeout(500)  # plotly resizes its charts on the window's resize
    assert page.evaluate(NO_PAGE_SCROLL)
    box = page.locator("#rounds").locator("xpath=..")
    assert box.evaluate("(e) => e.scrollWidth > e.clientWidth && getComputedStyle(e).overflowX === 'auto'")
    chart = page.locator("#chart-loss").bounding_box()
    assert chart is not None and chart["width"] <= 390


def test_runs_page_switching_and_narrow_layout(tmp_path: Path) -> None:
    run = record_showcase_run(tmp_path / "state", time.time())
    script_errors: list[str] = []
    failed: list[str] = []
    with standalone_dashboard(run.state_dir, "--read-token", READ) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda error: script_errors.append(str(error)))
            page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            sign_in_and_check_the_run_page(page, url)
            check_nodes_survive_polls(page)
            check_downloads_need_no_token_in_the_url(page, url)
            check_module_round_selector(page)
            check_runs_page_and_switching(page)
            page.locator("#module-round").select_option("")
            page.wait_for_selector("#chart-modules .main-svg")
            page.evaluate("window.scrollTo(0, 0)")
            shot = page.screenshot(full_page=True)
            check_narrow_layout(page)
            linked = browser.new_page()  # a link with ?token=: traded for the cookie, then dropped
            linked.goto(f"{url}/?token={READ}")
            linked.wait_for_function("document.getElementById('round-number').textContent === '7'")
            assert "token" not in linked.url and linked.locator("#login").is_hidden()
        finally:
            browser.close()
    assert not script_errors, f"the page's script failed: {script_errors}"
    assert not failed, f"requests failed (favicon, downloads, API): {failed}"
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    if target := os.environ.get("FEDROT_DASHBOARD_SCREENSHOT"):
        Path(target).write_bytes(shot)

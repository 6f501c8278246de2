"""Screenshot a running server's dashboard with Debian chromium (how docs/img/dashboard.png is
made): wait until ``--after-rounds`` rounds are completed, then save a full-page PNG.

    .venv/bin/python scripts/demo.py &          # prints "dashboard: http://127.0.0.1:PORT/"
    .venv/bin/python scripts/dashboard_screenshot.py --url http://127.0.0.1:PORT \
        --after-rounds 8 --out docs/img/dashboard.png

(A finished run's state can be served with ``python -m fedrot_server.dashboard --state-dir``.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking"]  # fmt: skip


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--after-rounds", type=int, default=1, help="rounds completed first")
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after (s)")
    return parser.parse_args(argv)


def rounds_completed(url: str) -> int | None:
    """The current run's completed rounds, or None while the dashboard does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/api/v1/runs/current", timeout=5) as response:
            return json.load(response)["run"]["rounds_completed"]
    except (urllib.error.URLError, OSError, KeyError, ValueError):
        return None


def wait_for_rounds(url: str, count: int, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while (done := rounds_completed(url)) is None or done < count:
        if time.monotonic() > end:
            raise TimeoutError(f"{url}: {done} rounds completed after {timeout_s:.0f} s, wanted {count}")
        time.sleep(1.0)


def screenshot(url: str, out: Path, width: int) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        raise RuntimeError("Debian chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 1000})
            page.goto(url + "/")
            page.wait_for_selector("#chart-modules .main-svg")
            page.wait_for_function("document.getElementById('round-number').textContent !== '–'")
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        wait_for_rounds(args.url, args.after_rounds, args.timeout)
        screenshot(args.url, args.out, args.width)
    except (TimeoutError, RuntimeError) as exc:
        print(f"dashboard_screenshot: {exc}", file=sys.stderr)
        return 1
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

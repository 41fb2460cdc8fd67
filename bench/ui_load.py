#!/usr/bin/env python3
"""How fast the web interface shows its first view, and how much it weighs.

Starts mkat with 50 services (some down, with alerts), opens the dashboard in Debian's Chromium
(already logged in for the tab), and reports, over several loads, the time from navigation start
to the dashboard's heading being in the page, plus the bytes of the interface's files.

    apt-get install -y chromium
    python bench/ui_load.py
"""

from __future__ import annotations

import signal
import statistics
import tempfile
from pathlib import Path

import requests
import running
from playwright.sync_api import sync_playwright
from running import AUTH, ROOT

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
# Runs before the page's own script: notes when the first <h1> appears in <main>.
WATCH_FIRST_VIEW = """
new MutationObserver((_, observer) => {
  if (document.querySelector("main h1")) { window.firstView = performance.now(); observer.disconnect(); }
}).observe(document, { childList: true, subtree: true });
"""


def main() -> None:
    static = ROOT / "mkat_static"
    sizes = {p.name: p.stat().st_size for p in static.iterdir()}
    print("interface files:", ", ".join(f"{k} {v / 1024:.1f} KB" for k, v in sorted(sizes.items())),
          f"= {sum(sizes.values()) / 1024:.1f} KB")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mkat-bench-") as tmp:
        proc, url = running.start_mkat(Path(tmp))
        try:
            session = requests.Session()
            session.auth = AUTH
            for i in range(50):
                body = {"name": f"service {i:02d}", "monitors": [{"type": "Webhook"}]}
                service = session.post(url + "/api/v1/services", json=body, timeout=10).json()
                if i % 7 == 0:
                    requests.post(f"{url}/webhook/{service['monitors'][0]['token']}/fail", timeout=10)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
                context = browser.new_context(bypass_csp=True)  # only so the watcher can run
                token = __import__("base64").b64encode(f"{AUTH[0]}:{AUTH[1]}".encode()).decode()
                context.add_init_script(f"sessionStorage.setItem('mkat.auth', '{token}');" + WATCH_FIRST_VIEW)
                page = context.new_page()
                times = []
                for i in range(10):
                    page.goto(f"{url}/?load={i}#/")  # a new query string: a full load each time
                    page.wait_for_function("window.firstView !== undefined")
                    times.append(page.evaluate("window.firstView"))
                browser.close()
            times.sort()
            print(
                f"first view (navigation start → dashboard heading), 10 loads: "
                f"median {statistics.median(times):.0f} ms, worst {times[-1]:.0f} ms, best {times[0]:.0f} ms"
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)


if __name__ == "__main__":
    main()

"""Open a run report in headless Chromium from disk and list every console message, page error and
failed load; optionally save a screenshot of the top of the page.

    python docs/check_report_in_browser.py runs/medpix_cpu/report.html --screenshot docs/report.png

Needs Chromium (Debian: apt-get install chromium) and websocket-client. Exits 1 if the page logged
anything at all, or if an image on it did not decode.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import websocket


def devtools_page(port: int, timeout: float = 30.0) -> str:
    deadline = time.time() + timeout
    while True:
        try:
            targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2))
            return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        except (OSError, StopIteration):
            if time.time() > deadline:
                raise
            time.sleep(0.3)


class Session:
    def __init__(self, url: str):
        self.ws = websocket.create_connection(url, timeout=120, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, method: str) -> None:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(json.loads(self.ws.recv()))


def problems_of(events: list[dict]) -> list[str]:
    found = []
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled":
            found.append(
                f"console.{params['type']}: "
                + " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Runtime.exceptionThrown":
            found.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Log.entryAdded":
            entry = params["entry"]
            found.append(f"log {entry['level']} ({entry['source']}): {entry['text']} {entry.get('url', '')}")
        elif method == "Network.loadingFailed":
            found.append(f"load failed: {params.get('errorText')}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("html", type=Path)
    parser.add_argument("--screenshot", type=Path)
    parser.add_argument("--width", type=int, default=1360)
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--port", type=int, default=9333)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={profile}",
                f"--remote-debugging-port={args.port}",
                f"--window-size={args.width},{args.height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            session = Session(devtools_page(args.port))
            for domain in ("Runtime", "Log", "Network", "Page"):
                session.call(f"{domain}.enable")
            session.call("Page.navigate", url=args.html.resolve().as_uri())
            session.wait_for("Page.loadEventFired")
            time.sleep(1.0)  # late console messages
            images = session.call(
                "Runtime.evaluate",
                returnByValue=True,
                expression=(
                    "Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])"
                ),
            )
            images = images["result"]["value"]
            if args.screenshot:
                shot = session.call("Page.captureScreenshot", format="png")
                args.screenshot.write_bytes(base64.b64decode(shot["data"]))
            problems = problems_of(session.events)
            title = session.call("Runtime.evaluate", expression="document.title", returnByValue=True)
        finally:
            browser.terminate()
            browser.wait(timeout=30)
    print(f"opened {args.html.resolve().as_uri()} ({title['result']['value']!r})")
    for alt, complete, width, height in images:
        print(f"  image {alt!r}: {'decoded' if complete and width else 'NOT decoded'} {width}x{height}")
    broken = [alt for alt, complete, width, _ in images if not (complete and width)]
    print(f"{len(problems)} console messages, errors or failed loads; {len(broken)} broken images")
    for p in problems:
        print("  " + p)
    return 1 if problems or broken or not images else 0


if __name__ == "__main__":
    sys.exit(main())

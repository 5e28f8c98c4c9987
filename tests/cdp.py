"""A small Chrome DevTools Protocol client for tests: headless Chromium, one page.

Theory of operation. Chromium starts with ``--remote-debugging-port=0`` and a throwaway
profile directory; it picks a free loopback port and writes it to ``DevToolsActivePort`` in
that directory, which :class:`Browser` waits for (with a deadline). The page target's
WebSocket URL comes from ``/json/list``, and every command is a JSON message with an ``id``
whose answer carries the same ``id``; messages without one are events, kept in
:attr:`Browser.events` (JavaScript exceptions and console errors are read from there).
Everything waits with a deadline; nothing sleeps and hopes.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from websockets.sync.client import connect


def find_chromium() -> str | None:
    """The Chromium (or Chrome) binary on PATH, if any."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class CdpError(Exception):
    """A DevTools command failed, or a page script threw."""


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, binary: str, profile: Path, *, width: int = 1280, height: int = 900,
                 timeout: float = 20.0) -> None:
        self.timeout = timeout
        self.width = width
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        args = [binary, "--headless=new", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--mute-audio",
                "--disable-background-networking", "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                f"--user-data-dir={profile}", f"--window-size={width},{height}",
                "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with it
        profile.mkdir(parents=True, exist_ok=True)
        self.log = profile / "chromium.log"  # a file, not a pipe: a full pipe would block it
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
        self._stack = ExitStack()
        try:
            port = self._devtools_port(profile / "DevToolsActivePort")
            self.ws = self._stack.enter_context(
                connect(self._page_url(port), max_size=None, proxy=None, open_timeout=timeout))
        except BaseException:
            self._stop_process()
            raise

    # --- start ---------------------------------------------------------------------------
    def _devtools_port(self, path: Path) -> int:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.log.read_text(errors="replace")
                raise CdpError(f"chromium exited with {self.proc.returncode}:\n{err[-2000:]}")
            try:
                first = path.read_text().split("\n", 1)[0]
            except OSError:
                first = ""
            if first.strip().isdigit():
                return int(first)
            time.sleep(0.05)
        raise CdpError(f"chromium did not write {path} within {self.timeout}s")

    def _page_url(self, port: int) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=self.timeout)
        try:
            conn.request("GET", "/json/list")
            targets = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            raise CdpError(f"no page target in {targets!r}")
        return str(pages[0]["webSocketDebuggerUrl"])

    # --- commands ------------------------------------------------------------------------
    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Run one command; its result (events that arrive meanwhile are kept)."""
        self._next_id += 1
        ident = self._next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CdpError(f"{method}: no answer within {self.timeout}s")
            message = json.loads(self.ws.recv(timeout=left))
            if message.get("id") != ident:
                self.events.append(message)
                continue
            if "error" in message:
                raise CdpError(f"{method}: {message['error']}")
            return dict(message.get("result", {}))

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"page script failed: {text}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, *, timeout: float = 15.0, what: str = "",
                 accept: Callable[[Any], bool] = bool) -> Any:
        """Evaluate ``expression`` until ``accept(value)``; fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if accept(value):
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what or expression} "
                             f"(last value {value!r}; page errors: {self.page_errors()})")

    def navigate(self, url: str) -> None:
        """Open ``url`` and wait until the document has loaded."""
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Log.enable")
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise CdpError(f"navigation to {url} failed: {result['errorText']}")
        self.wait_for("document.readyState === 'complete'", what=f"{url} to load")

    def screenshot(self, path: Path) -> bytes:
        """A PNG of the whole page (not just the window), written to ``path``."""
        metrics = self.send("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        self.send("Emulation.setDeviceMetricsOverride", width=self.width,
                  height=max(1, math.ceil(size["height"])), deviceScaleFactor=1, mobile=False)
        try:
            data = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        finally:
            self.send("Emulation.clearDeviceMetricsOverride")
        path.write_bytes(data)
        return data

    def page_errors(self) -> list[str]:
        """Uncaught exceptions and console/log errors the page has reported so far."""
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                errors.append(details.get("exception", {}).get("description")
                              or details.get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                errors.append(" ".join(str(a.get("value", a.get("description", "")))
                                       for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                errors.append(params["entry"].get("text", ""))
        return errors

    # --- stop ----------------------------------------------------------------------------
    def close(self) -> None:
        try:
            self._stack.close()
        finally:
            self._stop_process()

    def _stop_process(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

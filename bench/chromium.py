"""Debian's headless Chromium, driven by Playwright: the one launch the dashboard's browser test and its
benchmark share (`make test` installs the binary as root)."""

from __future__ import annotations

import shutil

from playwright.sync_api import Browser, Playwright

BINARY = shutil.which("chromium") or shutil.which("chromium-browser")
MISSING = "no chromium binary: `apt-get install chromium` (make test does it as root)"
# offline machines: no sandbox (root in a container), no GPU, and nothing that would call out
ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def launch(pw: Playwright) -> Browser:
    """A headless Chromium from Debian's binary; refused with the fix where it is not installed."""
    if BINARY is None:
        raise RuntimeError(MISSING)
    return pw.chromium.launch(executable_path=BINARY, args=list(ARGS))

"""Screenshots of an ``lmforge inspect`` page in headless Chromium (the pictures in docs/inspect.md).

    python bench/inspect_screenshots.py PAGE.html OUT_PREFIX VIEW[:OPTION] ... [--hover I] [--zoom L,H]

VIEW is a tab (tokens, attention, lens, backoff, state); OPTION picks, for tokens, the colouring (bits or
rank), for attention the kind (self, encoder, cross), for lens the shading (p, kl, true). ``--hover I``
hovers token I in the tokens views, ``--zoom L,H`` opens the I-th shown layer's H-th head. Writes
OUT_PREFIX-VIEW[-OPTION].png; fails on any console error or any request but the page's own file URL.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("page")
    ap.add_argument("prefix")
    ap.add_argument("views", nargs="+")
    ap.add_argument("--hover", type=int, default=None)
    ap.add_argument("--zoom", default=None)
    ap.add_argument("--width", type=int, default=1300)
    ap.add_argument("--height", type=int, default=860)
    a = ap.parse_args()
    url = Path(a.page).resolve().as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": a.width, "height": a.height})
        errors: list[str] = []
        requests: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(url)
        for spec in a.views:
            view, _, opt = spec.partition(":")
            page.click(f"nav button[data-v={view}]")
            if view == "tokens" and opt:
                page.check(f"input[name=mode][value={opt}]")
            if view == "attention":
                if opt:
                    page.check(f"input[name=kind][value={opt}]")
                if a.zoom:
                    li, hi = (int(x) for x in a.zoom.split(","))
                    page.click(f".grid canvas[data-li='{li}'][data-hi='{hi}']")
                page.wait_for_timeout(1500)
            if view == "lens" and opt:
                page.select_option("#lensmode", opt)
            page.wait_for_timeout(400)
            if a.hover is not None and view in ("tokens", "backoff"):
                page.hover(f"#v-{view} .tk[data-i='{a.hover}']")
            out = f"{a.prefix}-{view}{'-' + opt if opt else ''}.png"
            page.screenshot(path=out)
            print("wrote", out)
        browser.close()
    print("console errors:", errors, "requests:", requests)
    return 0 if not errors and requests == [url] else 1


if __name__ == "__main__":
    sys.exit(main())

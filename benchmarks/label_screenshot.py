"""The README's screenshot of the labeling page (docs/img/label-page.png): a queue of the shipped shapes-world model's
images, the real server, Debian's chromium driven by playwright, two raters' labels so that the counts show.

    python benchmarks/label_screenshot.py QUEUE_DIR docs/img/label-page.png

QUEUE_DIR: a queue folder (e.g. `dkto generate --prompts toy --per-prompt 2 --out QUEUE_DIR`); its labels.sqlite
gets the labels of raters "alice" and "bob"."""
from __future__ import annotations

import shutil
import sys
import threading

from playwright.sync_api import sync_playwright

from diffusion_kto.apps.label.server import make_server, url_of

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(queue: str, png: str) -> None:
    """Label a few images as two raters by key presses, then take the page's screenshot."""
    server = make_server(queue, "127.0.0.1", 0, token="demo")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)
        for rater, keys in (("bob", "ldl"), ("alice", "lldsl")):
            page = browser.new_context(viewport={"width": 760, "height": 800}).new_page()
            page.goto(url_of(server, "demo") + f"&rater={rater}")
            for key in keys:
                page.wait_for_selector("#image:not([data-id=''])", state="attached")
                shown = page.get_attribute("#image", "data-id")
                page.keyboard.press(key)
                page.wait_for_function(f"document.getElementById('image').dataset.id !== '{shown}'")
            page.wait_for_function("document.getElementById('raters').textContent.includes('bob')")
            page.wait_for_timeout(300)
        page.screenshot(path=png)
        browser.close()
    server.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

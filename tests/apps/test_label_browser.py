"""The labeling page in a real headless Chromium (Debian's, driven by playwright): key presses land as labels, undo
works, no rater sees an image twice, and two raters can label one image. Skipped, with the reason, only where no
chromium binary (or playwright) is installed."""
import os
import shutil
import sqlite3

import pytest

from label_helpers import make_queue, start_server

TOKEN = "tok"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    """The system's chromium binary, if any."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    if executable is None:
        reason = "no chromium binary (apt-get install chromium): the labeling page's browser tests are skipped"
        print(reason)
        pytest.skip(reason)
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def served(tmp_path):
    folder = make_queue(tmp_path / "q", n=4)
    proc, base = start_server(folder, "--token", TOKEN)
    yield folder, base
    proc.kill()
    proc.wait()


def _shown(page) -> str:
    """The id of the image on screen, once it changes from the last one (waits for the page)."""
    return page.get_attribute("#image", "data-id")


def _press(page, key: str, expect: str) -> None:
    """Press a key and wait until the page shows image ``expect`` ("" = nothing left)."""
    page.keyboard.press(key)
    page.wait_for_selector(f'#image[data-id="{expect}"]', state="attached", timeout=15_000)


def _labels(folder) -> list[tuple]:
    """Every event, in order: (item, rater, kind)."""
    db = sqlite3.connect(folder / "labels.sqlite")
    try:
        return db.execute("SELECT item, rater, kind FROM events ORDER BY seq").fetchall()
    finally:
        db.close()


def test_keys_label_undo_and_two_raters(browser, served):
    folder, base = served
    alice = browser.new_context(viewport={"width": 760, "height": 760}).new_page()
    alice.goto(f"{base}/?token={TOKEN}&rater=alice")
    alice.wait_for_selector('#image[data-id="000000"]', state="attached", timeout=15_000)
    assert alice.text_content("#prompt") == "a red circle"
    seen = [_shown(alice)]
    for key, expect in (("l", "000001"), ("ArrowLeft", "000002"), ("u", "000001"), ("d", "000002"),
                        ("s", "000003")):
        _press(alice, key, expect)
        seen.append(expect)
    alice.wait_for_function("document.getElementById('progress').textContent.includes('3 of 4')")
    if os.environ.get("DKTO_LABEL_SCREENSHOT"):  # docs/img/label-page.png is taken this way (README)
        alice.screenshot(path=os.environ["DKTO_LABEL_SCREENSHOT"])
    _press(alice, "ArrowRight", "")
    assert "Nothing left" in alice.text_content("#prompt")
    assert _labels(folder) == [("000000", "alice", "like"), ("000001", "alice", "dislike"),
                               ("000001", "alice", "undo"), ("000001", "alice", "dislike"),
                               ("000002", "alice", "skip"), ("000003", "alice", "like")]
    # alice saw each image once, except the one her undo brought back
    assert seen == ["000000", "000001", "000002", "000001", "000002", "000003"]

    bob = browser.new_context().new_page()  # no ?rater=: bob types his name into the page
    bob.goto(f"{base}/?token={TOKEN}")
    bob.fill("#rater-input", "bob")
    bob.press("#rater-input", "Enter")
    bob.wait_for_selector('#image[data-id="000000"]', state="attached", timeout=15_000)
    shown = ["000000"]
    for key, expect in (("l", "000001"), ("d", "000002"), ("l", "000003"), ("l", "")):
        _press(bob, key, expect)
        shown.append(expect)
    assert shown[:-1] == ["000000", "000001", "000002", "000003"]  # no image twice
    bob_labels = [e for e in _labels(folder) if e[1] == "bob"]
    assert [e[0] for e in bob_labels] == ["000000", "000001", "000002", "000003"]
    assert ("000000", "alice", "like") in _labels(folder) and ("000000", "bob", "like") in bob_labels
    bob.wait_for_function("document.getElementById('raters').textContent.includes('alice')")
    table = bob.text_content("#raters")
    assert "alice" in table and "bob" in table

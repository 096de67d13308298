"""The labeling server as a real subprocess: the JSON API, its refusals, and no acknowledged label lost to SIGKILL."""
import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from label_helpers import make_queue, request, start_server

from diffusion_kto.apps.label.server import check_host
from diffusion_kto.apps.label.store import LabelError

TOKEN = "s3cret-token"


def _serve(tmp_path):
    folder = make_queue(tmp_path / "q", n=3)
    (tmp_path / "secret.txt").write_text("outside the queue")
    os.symlink(tmp_path / "secret.txt", folder / "images" / "link.png")  # a symlink out of the folder
    with open(folder / "queue.jsonl", "a") as fh:  # queue rows that point outside it
        fh.write('{"id": "escape", "image": "../secret.txt", "prompt": "x"}\n')
        fh.write('{"id": "link", "image": "images/link.png", "prompt": "x"}\n')
        fh.write('{"id": "abs", "image": "%s", "prompt": "x"}\n' % (tmp_path / "secret.txt"))
    proc, base = start_server(folder, "--token", TOKEN)
    return proc, folder, base


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server for the refusal tests, which must record nothing."""
    proc, folder, base = _serve(tmp_path_factory.mktemp("refusals"))
    yield folder, base
    proc.kill()
    proc.wait()


@pytest.fixture
def fresh(tmp_path):
    proc, folder, base = _serve(tmp_path)
    yield folder, base
    proc.kill()
    proc.wait()


def test_api_round_trip_with_the_token(fresh):
    folder, base = fresh
    status, item = request(base, "/api/next?rater=alice", token=TOKEN)
    assert status == 200 and item == {"id": "000000", "image_url": "/images/000000", "prompt": "a red circle"}
    status, png = request(base, item["image_url"], token=TOKEN)
    assert status == 200 and png == (folder / "images" / "000000.png").read_bytes()
    assert request(base, "/api/label", {"id": "000000", "rater": "alice", "label": "like"}, token=TOKEN)[0] == 200
    status, stats = request(base, "/api/stats", token=TOKEN)
    assert stats["raters"]["alice"]["like"] == 1 and stats["labelled"] == 1
    for i in ("000001", "000002", "escape", "link", "abs"):
        assert request(base, "/api/label", {"id": i, "rater": "alice", "label": "skip"}, token=TOKEN)[0] == 200
    assert request(base, "/api/next?rater=alice", token=TOKEN) == (204, None)  # nothing left for alice
    status, undone = request(base, "/api/undo", {"rater": "alice"}, token=TOKEN)
    assert status == 200 and undone["undone"]["id"] == "abs"
    status, page = request(base, f"/?token={TOKEN}&rater=alice")
    assert status == 200 and b"<script>" in page


@pytest.mark.parametrize("path, body, token, status, message", [
    ("/api/next?rater=a", None, None, 401, "Authorization: Bearer"),
    ("/api/next?rater=a", None, "wrong", 401, "missing or wrong token"),
    ("/api/stats", None, None, 401, "token"),
    ("/api/label", {"id": "000000", "rater": "a", "label": "like"}, None, 401, "token"),
    ("/images/000000", None, None, 401, "token"),
    ("/?rater=a", None, None, 401, "open the page as /?token="),
    ("/?token=wrong", None, None, 401, "open the page as /?token="),
    ("/api/label", {"id": "nope", "rater": "a", "label": "like"}, TOKEN, 404, "no image 'nope'"),
    ("/api/label", {"id": "000000", "rater": "a", "label": "meh"}, TOKEN, 400, "'meh' is not one of"),
    ("/api/label", {"id": "000000", "rater": "a"}, TOKEN, 400, "missing field 'label'"),
    ("/api/label", {"rater": "a", "label": "like"}, TOKEN, 400, "missing field 'id'"),
    ("/api/label", {"id": "000000", "label": "like"}, TOKEN, 400, "missing field 'rater'"),
    ("/api/label", ["a list"], TOKEN, 400, "must be a JSON object"),
    ("/api/label", {"id": ["x"], "rater": "a", "label": "like"}, TOKEN, 400, "id: give the id"),
    ("/api/label", {"id": "000000", "rater": {"n": 1}, "label": "like"}, TOKEN, 400, "rater: give a non-empty"),
    ("/api/next", None, TOKEN, 400, "rater: give a non-empty name"),
    ("/api/undo", {"rater": "nobody"}, TOKEN, 409, "no label to undo"),
    ("/api/nothing", None, TOKEN, 404, "no such route"),
    # traversal: nothing but a queue item's own file inside the folder is ever served
    ("/images/../labels.sqlite", None, TOKEN, 404, None),
    ("/images/%2e%2e/labels.sqlite", None, TOKEN, 404, "no image '../labels.sqlite'"),
    ("/images/%2e%2e%2fqueue.jsonl", None, TOKEN, 404, "no image '../queue.jsonl'"),
    ("/images/..%2f..%2f..%2fetc%2fpasswd", None, TOKEN, 404, "no image"),
    ("/images//etc/passwd", None, TOKEN, 404, "no image '/etc/passwd'"),
    ("/images/%2Fetc%2Fpasswd", None, TOKEN, 404, "no image '/etc/passwd'"),
    ("/images/images%2F000000.png", None, TOKEN, 404, "no image"),
    ("/images/escape", None, TOKEN, 404, "not a file inside the queue folder"),
    ("/images/link", None, TOKEN, 404, "not a file inside the queue folder"),
    ("/images/abs", None, TOKEN, 404, "not a file inside the queue folder"),
])
def test_refusals(served, path, body, token, status, message):
    _, base = served
    got, payload = request(base, path, body, token=token)
    assert got == status
    if message:
        assert message in payload["error"]
    assert request(base, "/api/stats", token=TOKEN)[1]["events"] == 0  # nothing was recorded


def test_malformed_bodies_get_4xx_not_500(served):
    _, base = served
    assert request(base, "/api/label", raw=b"{not json", token=TOKEN)[0] == 400
    assert request(base, "/api/label", raw=b"\xff\xfe", token=TOKEN)[0] == 400
    assert request(base, "/api/label", raw=b"x" * 70_000, token=TOKEN)[0] == 413
    assert request(base, "/api/label", method="GET", token=TOKEN)[0] == 405


def test_serving_beyond_loopback_without_a_token_is_refused(tmp_path):
    check_host("127.0.0.1", None)
    check_host("localhost", None)
    check_host("0.0.0.0", "t")
    with pytest.raises(LabelError, match="without --token"):
        check_host("0.0.0.0", None)
    folder = make_queue(tmp_path / "q", n=1)
    proc = subprocess.run([sys.executable, "-m", "diffusion_kto.cli", "label", "serve", str(folder), "--host", "0.0.0.0",
                           "--port", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to serve labels there without --token" in lines[0]


def test_sigkill_between_labels_loses_no_acknowledged_label(tmp_path):
    folder = make_queue(tmp_path / "q", n=12)
    acknowledged = []
    for round_ in range(3):
        proc, base = start_server(folder)
        for k in range(4):
            item = request(base, f"/api/next?rater=r{k % 2}")[1]
            status, answer = request(base, "/api/label", {"id": item["id"], "rater": f"r{k % 2}", "label": "like"})
            assert status == 200
            acknowledged.append((item["id"], f"r{k % 2}", answer["event"]))
        os.kill(proc.pid, signal.SIGKILL)  # no shutdown, no checkpoint
        proc.wait()
    db = sqlite3.connect(folder / "labels.sqlite")
    stored = db.execute("SELECT item, rater, seq FROM events WHERE kind = 'like' ORDER BY seq").fetchall()
    assert stored == acknowledged and len(stored) == 12
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

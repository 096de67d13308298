"""Helpers of the labeling-app tests: a queue folder, a real server in a subprocess, JSON requests."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from PIL import Image


def make_queue(folder: Path, n: int = 4, prompts=("a red circle", "a blue square")) -> Path:
    """A queue folder as dkto generate writes it: images/<id>.png and queue.jsonl (n images, prompts in turn)."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (32, 32), (40 * i % 256, 100, 200)).save(folder / "images" / f"{i:06d}.png")
        rows.append({"id": f"{i:06d}", "image": f"images/{i:06d}.png", "prompt": prompts[i % len(prompts)],
                     "model": "toy", "adapter": None, "seed": i})
    (folder / "queue.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, *extra: str, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """``dkto label serve`` in a subprocess; (process, base URL) once it answers."""
    port = port or free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffusion_kto.cli", "label", "serve", str(folder),
                             "--port", str(port), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, base
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start in 30 s")


def request(base: str, path: str, body=None, token: str | None = None, raw: bytes | None = None,
            method: str | None = None) -> tuple[int, dict | bytes | None]:
    """(status, parsed JSON or bytes or None) of one request; HTTP errors are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method or ("POST" if data is not None else "GET"))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            status, payload, kind = res.status, res.read(), res.headers.get("Content-Type")
    except urllib.error.HTTPError as err:
        status, payload, kind = err.code, err.read(), err.headers.get("Content-Type")
    if kind == "application/json":
        return status, json.loads(payload)
    return status, payload or None

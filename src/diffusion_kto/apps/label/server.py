"""``dkto label serve``: the labeling web app, on the standard library's threaded HTTP server.

Routes (the JSON API is for scripts as much as for the page):

* ``GET /`` the page (``/?rater=NAME&token=T``); ``GET /images/<id>`` an image of the queue, by its id;
* ``GET /api/next?rater=R`` -> ``{"id", "image_url", "prompt", ...}``, or 204 when nothing is left for R;
* ``POST /api/label`` ``{"id", "rater", "label": "like"|"dislike"|"skip"}``; ``POST /api/undo`` ``{"rater"}``;
* ``GET /api/stats``.

With a token every API and image request needs ``Authorization: Bearer <token>`` (401 otherwise) and the page
needs ``?token=<token>``; the page keeps the token for its own requests. Images are looked up by id in the queue
and served only when the file resolves inside the queue folder: no path from a request reaches the file system.
A bad request gets a 4xx JSON ``{"error": message}``."""
from __future__ import annotations

import hmac
import ipaddress
import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from .store import QUEUE_FILE, Item, LabelError, LabelStore

PAGE = Path(__file__).resolve().parent / "page.html"
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
MAX_BODY = 64 * 1024  # bytes of a JSON request


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback one (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_host(host: str, token: str | None) -> None:
    """Refuse to serve beyond this machine without a token (LabelError, one line)."""
    if not token and not is_loopback(host):
        raise LabelError(f"--host {host} is reachable from other machines: refusing to serve labels there without "
                         "--token (anyone could label); pass --token SECRET or serve on 127.0.0.1")


class LabelApp:
    """What every request of one server shares: the queue folder, the token, and when the queue was last synced."""

    def __init__(self, folder: str | Path, token: str | None = None):
        self.folder, self.token = Path(folder).resolve(), token or None
        self.lock = threading.Lock()
        self.synced = None
        with self.store() as store:
            self.sync(store)

    def store(self) -> _OpenStore:
        """A store connection for one request (sqlite connections are not shared between threads)."""
        return _OpenStore(self.folder)

    def sync(self, store: LabelStore) -> None:
        """Add images appended to the queue since the last sync (dkto generate may still be writing it)."""
        stamp = (self.folder / QUEUE_FILE).stat().st_mtime_ns
        with self.lock:
            if stamp != self.synced:
                store.sync_queue()
                self.synced = stamp

    def authorised(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the token (always, without a token)."""
        if self.token is None:
            return True
        scheme, _, value = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())

    def image_file(self, item_id: str) -> Path:
        """The file of queue image ``item_id``, only when it resolves inside the queue folder (LabelError 404)."""
        with self.store() as store:
            item = store.item(item_id)
        path = (self.folder / item.image).resolve()
        if not path.is_relative_to(self.folder) or not path.is_file() or path.suffix.lower() not in IMAGE_TYPES:
            raise LabelError(f"image of {item_id!r} is not a file inside the queue folder", status=404)
        return path


class _OpenStore:
    """``with app.store() as store``: a LabelStore closed on exit."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __enter__(self) -> LabelStore:
        self.store = LabelStore(self.folder)
        return self.store

    def __exit__(self, *exc) -> bool:
        self.store.close()
        return False


def item_json(item: Item) -> dict:
    """The API's view of an image: id, same-server image URL, prompt."""
    return {"id": item.id, "image_url": f"/images/{item.id}", "prompt": item.prompt}


class Handler(BaseHTTPRequestHandler):
    """One request: route, check the token, answer JSON (errors as ``{"error": ...}`` with a 4xx)."""

    app: LabelApp  # set on the subclass made by make_server
    server_version = "dkto-label/1"

    def log_message(self, format, *args) -> None:  # noqa: A002 (the base class's name)
        """Quiet: no access log on stderr."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        """GET routes."""
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        """POST routes."""
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        """Route one request; LabelError -> its status, any other failure -> 500 with its one-line reason."""
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            route = ROUTES.get((method, url.path))
            if url.path.startswith("/images/") and method == "GET":
                route = Handler._image
            if route is None:
                known = any(path == url.path for _, path in ROUTES) or url.path.startswith("/images/")
                raise LabelError(f"{method} {url.path}: " + ("method not allowed" if known else "no such route"),
                                 status=405 if known else 404)
            if url.path != "/" and not self.app.authorised(self.headers.get("Authorization")):
                raise LabelError("missing or wrong token: send the header 'Authorization: Bearer <token>'", status=401)
            route(self, url.path, query)
        except LabelError as err:
            self._json({"error": str(err)}, err.status)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as err:  # a bug, not a bad request: say what, keep serving
            print(f"dkto label serve: {self.command} {url.path}: {err!r}", file=sys.stderr)
            self._json({"error": f"internal error: {type(err).__name__}"}, 500)

    def _json(self, payload: dict | None, status: int = 200) -> None:
        """Send a JSON answer (204: none)."""
        body = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Cache-Control", "no-store")
        if payload is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> dict:
        """The request's JSON object (LabelError 400 / 413 when it is not one)."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise LabelError("Content-Length is not a number") from None
        if length > MAX_BODY:
            raise LabelError(f"request body over {MAX_BODY} bytes", status=413)
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LabelError("the body is not JSON; send {\"id\", \"rater\", \"label\"}") from None
        if not isinstance(body, dict):
            raise LabelError("the body must be a JSON object")
        return body

    @staticmethod
    def _field(body: dict, name: str):
        """A required field of a JSON body (LabelError 400 naming it)."""
        if name not in body:
            raise LabelError(f"missing field {name!r}")
        return body[name]

    def _page(self, path: str, query: dict) -> None:
        """The labeling page; with a token, only as /?token=<token>."""
        if self.app.token is not None and not self.app.authorised(f"Bearer {query.get('token', '')}"):
            raise LabelError("open the page as /?token=<token> (the token the server was started with)", status=401)
        body = PAGE.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _next(self, path: str, query: dict) -> None:
        """The next image for a rater, or 204."""
        with self.app.store() as store:
            self.app.sync(store)
            item = store.next_item(query.get("rater"))
        self._json(None, 204) if item is None else self._json(item_json(item))

    def _label(self, path: str, query: dict) -> None:
        """Record a label (committed before the answer)."""
        body = self._body()
        item_id, rater, label = (self._field(body, k) for k in ("id", "rater", "label"))
        with self.app.store() as store:
            seq = store.label(item_id, rater, label)
        self._json({"ok": True, "event": seq})

    def _undo(self, path: str, query: dict) -> None:
        """Take back the rater's latest label; the image it was on comes next."""
        body = self._body()
        with self.app.store() as store:
            item = store.undo(self._field(body, "rater"))
        self._json({"ok": True, "undone": item_json(item)})

    def _stats(self, path: str, query: dict) -> None:
        """Counts: images, labelled, events, per rater."""
        with self.app.store() as store:
            self.app.sync(store)
            self._json(store.stats())

    def _image(self, path: str, query: dict) -> None:
        """An image of the queue, by id."""
        file = self.app.image_file(unquote(path[len("/images/"):]))
        body = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", IMAGE_TYPES[file.suffix.lower()])
        self.send_header("Cache-Control", "private, max-age=3600")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ROUTES = {("GET", "/"): Handler._page, ("GET", "/api/next"): Handler._next, ("GET", "/api/stats"): Handler._stats,
          ("POST", "/api/label"): Handler._label, ("POST", "/api/undo"): Handler._undo}


def make_server(folder: str | Path, host: str = "127.0.0.1", port: int = 8765,
                token: str | None = None) -> ThreadingHTTPServer:
    """A bound (not yet serving) server for the queue in ``folder``; port 0 picks a free one."""
    check_host(host, token)
    app = LabelApp(folder, token)
    handler = type("LabelHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def url_of(server: ThreadingHTTPServer, token: str | None = None) -> str:
    """The page's address, with the token when there is one."""
    host, port = server.server_address[:2]
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/" + (f"?token={token}" if token else "")


def serve(folder: str | Path, host: str = "127.0.0.1", port: int = 8765, token: str | None = None) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    import signal

    server = make_server(folder, host, port, token)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"labeling {Path(folder)} at {url_of(server, token)}  (keys: l / -> like, d / <- dislike, s skip, u undo)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

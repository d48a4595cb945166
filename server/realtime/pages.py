"""The public port's web pages: the viewer page, the ops dashboard and their static files,
read once from the package (server/web/) and answered from memory.

Only the names listed here are served, matched whole: no path is ever joined onto a folder,
so no request can reach another file. Every answer carries an ETag and `no-cache` (the files
are not versioned by name, so a browser revalidates and an upgrade is seen at once) and a
Content-Security-Policy that lets the pages load only themselves and talk only WebSocket.
"""

from __future__ import annotations

import email.utils
import hashlib
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

STATIC_PREFIX = "/static/"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page routes and the files behind them; the static files are served by their name.
PAGES = {"/": "index.html", "/ops": "ops.html"}
STATIC_FILES = ("client.js", "viewer.js", "ops.js", "style.css", "gifts.css")
_SECURITY_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'self'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
)


@dataclass(frozen=True, slots=True)
class WebFile:
    body: bytes
    content_type: str
    etag: str


class Pages:
    """The web files, loaded once at start (a missing one fails the start, not a request)."""

    def __init__(self) -> None:
        folder = resources.files("giftstream.server").joinpath("web")
        self.files: dict[str, WebFile] = {}
        for name in {*PAGES.values(), *STATIC_FILES}:
            body = folder.joinpath(name).read_bytes()
            suffix = name[name.rfind(".") :]
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            self.files[name] = WebFile(body, _TYPES[suffix], etag)

    def answer(self, path: str, request: Request) -> Response | None:
        """The response for a page or static file at `path`; None when it is not one."""
        name = PAGES.get(path)
        if name is None and path.startswith(STATIC_PREFIX):
            name = path.removeprefix(STATIC_PREFIX)
        found = self.files.get(name) if name is not None else None
        if found is None:
            return None
        headers = Headers(
            [
                ("Date", email.utils.formatdate(usegmt=True)),
                ("Content-Type", found.content_type),
                ("Cache-Control", "no-cache"),
                ("ETag", found.etag),
                *_SECURITY_HEADERS,
            ]
        )
        if request.headers.get("If-None-Match") == found.etag:
            headers["Content-Length"] = "0"
            return Response(HTTPStatus.NOT_MODIFIED.value, "Not Modified", headers, b"")
        headers["Content-Length"] = str(len(found.body))
        return Response(HTTPStatus.OK.value, "OK", headers, found.body)

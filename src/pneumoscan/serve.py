"""`pneumoscan serve --model BUNDLE`: serve the web app and one model bundle over HTTP.

The page (`web/`) runs the model in the browser with TensorFlow.js; this server only hands out
files, so no image ever reaches it. Every URL is an explicit route to one file:

    /                                 web/index.html
    /static/<name>                    the files of web/ (no sub-folders)
    /vendor/<name>                    an allow-list of TF.js and dicom-parser files from node_modules
    /model/metadata.json              BUNDLE/metadata.json
    /model/tfjs/model.json            BUNDLE/tfjs/model.json
    /model/tfjs/group1-shardXofN.bin  the weight shards listed by model.json
    /healthz                          {"status": "ok", "model": arch, ...}

Anything else is 404 (400 for a path that tries to climb out), only GET and HEAD are allowed,
and every answer carries `X-Content-Type-Options: nosniff`, a Content-Security-Policy that
allows nothing but this origin, WebAssembly compilation, blob:/data: image previews and the
blob: scripts of TF.js' wasm threads, and the cross-origin isolation headers
(`Cross-Origin-Opener-Policy: same-origin`, `Cross-Origin-Embedder-Policy: require-corp`) that
let those threads share memory.

Only the host names the server was started for are answered (`Host`: 127.0.0.1, localhost, ::1
or `--host`, with any port, since a tunnel or container may publish another; any IP address as
well when `--host` is 0.0.0.0 or ::), others get 421, so a web page cannot read the model
through DNS rebinding. A request's line and headers
must arrive within REQUEST_TIMEOUT_S of its first byte, and at most MAX_CONNECTIONS connections
are served at once (one thread each); more get a 503 and are closed.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.server
import io
import ipaddress
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from pneumoscan import __version__
from pneumoscan import metadata as metadata_io

WEB_DIR = Path(__file__).resolve().parent / "web"
NODE_MODULES_ENV = "PNEUMOSCAN_NODE_MODULES"
# The npm files the page loads: name under /vendor/ -> path under node_modules. TF.js's ES2017
# builds, because the ES5 ones fall back to `Function(...)` for regenerator-runtime, which the
# Content-Security-Policy (rightly) forbids.
VENDOR_FILES = {
    "tf.es2017.min.js": "@tensorflow/tfjs/dist/tf.es2017.min.js",
    "tf-backend-wasm.es2017.min.js": "@tensorflow/tfjs-backend-wasm/dist/tf-backend-wasm.es2017.min.js",
    "tfjs-backend-wasm.wasm": "@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm.wasm",
    "tfjs-backend-wasm-simd.wasm": "@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm-simd.wasm",
    "tfjs-backend-wasm-threaded-simd.wasm": (
        "@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm-threaded-simd.wasm"
    ),
    # dicom-parser's UMD build (a global `dicomParser`); it needs no eval.
    "dicomParser.min.js": "dicom-parser/dist/dicomParser.min.js",
}
MIME_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".bin": "application/octet-stream",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# The page needs its own scripts, WebAssembly compilation (tfjs-backend-wasm), fetches to
# this origin, and blob:/data: images for previews. Nothing may frame it or post from it.
# blob: scripts are TF.js' wasm threads: its threaded build starts each worker from a blob: URL
# and the worker (which inherits this policy) imports the backend's code from another; both are
# made by the page's own scripts from the files above, and no page can create a blob: URL of
# another origin. Without blob: the page runs one thread (app.js checks before it starts).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self' 'wasm-unsafe-eval' blob:",
        "style-src 'self'",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
# COOP same-origin with COEP require-corp makes the page cross-origin isolated: it may then
# share memory with workers (SharedArrayBuffer), which TF.js' threaded wasm build needs. Every
# file the page loads is from this origin, so COEP blocks nothing it uses.
ISOLATION_HEADER = "Cross-Origin-Embedder-Policy"


def response_headers(cross_origin_isolated: bool = True) -> dict[str, str]:
    """The headers on every answer; without COEP when `cross_origin_isolated` is False (the
    page then runs TF.js' single-threaded wasm: benchmarks/speed/browser_bench.py's baseline)."""
    return {
        name: value
        for name, value in SECURITY_HEADERS.items()
        if cross_origin_isolated or name != ISOLATION_HEADER
    }


# Page, metadata and model change with each export or release: revalidate every time (ETag).
# Vendor files are fixed by package-lock.json: cache them for a week.
NO_CACHE = "no-cache"
VENDOR_CACHE = "public, max-age=604800"
CHUNK_BYTES = 256 * 1024
# Connections the kernel may hold for accept() (listen backlog; Linux caps it at
# net.core.somaxconn). http.server's default of 5 made the 6th of 50 simultaneous clients wait
# for a SYN retransmission, 1 s or more (BENCHMARKS.md, "serve under load").
REQUEST_QUEUE_SIZE = 1024
# Seconds a keep-alive connection may stay silent before the server closes it.
IDLE_TIMEOUT_S = 30.0
# Seconds from a request's first byte to the end of its headers, however slowly they trickle in
# (the idle timeout is per recv: alone, it lets a client send a byte every 29 s for ever).
REQUEST_TIMEOUT_S = 10.0
# Connections served at once, one thread each (a page uses about six); the next is answered 503
# and closed. Twice the 50 clients of benchmarks/scale/serve_load.py.
MAX_CONNECTIONS = 100
BUSY_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 16\r\nRetry-After: 1\r\nConnection: close\r\n"
    + "".join(f"{name}: {value}\r\n" for name, value in SECURITY_HEADERS.items()).encode("ascii")
    + b"\r\n503 server busy\n"
)
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
# A Host header: a name or IPv4 address, or an IPv6 address in brackets; then an optional port.
HOST_HEADER = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9.-]+)(?::([0-9]{1,5}))?")


from pneumoscan.errors import ServeError  # noqa: E402  (defined in errors.py since it holds them all)


@dataclass(frozen=True)
class Route:
    path: Path
    cache_control: str


def node_modules_dir() -> Path:
    """`$PNEUMOSCAN_NODE_MODULES`, else the repository's node_modules (editable install)."""
    override = os.environ.get(NODE_MODULES_ENV)
    return Path(override) if override else Path(__file__).resolve().parents[2] / "node_modules"


def vendor_files(node_modules: Path | None = None) -> dict[str, Path]:
    """The allow-listed npm files (TF.js, dicom-parser), checked to exist.

    Raises:
        ServeError: if any is missing.
    """
    root = node_modules if node_modules is not None else node_modules_dir()
    files = {name: root / relative for name, relative in VENDOR_FILES.items()}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise ServeError(
            "the page's npm files (TF.js, dicom-parser) are missing: run `npm ci` (or `make demo`); "
            f"not found: {missing[0]}"
        )
    return files


def bundle_routes(bundle: Path) -> tuple[dict[str, Route], dict]:
    """The model's URL -> file routes, and its validated metadata.

    Raises:
        ServeError: if `bundle` is not an exported bundle with a complete tfjs/ folder.
        MetadataError: if its metadata.json breaks the schema.
    """
    bundle = Path(bundle).resolve()
    hint = "run pneumoscan export first"
    if not (bundle / metadata_io.FILE_NAME).is_file():
        raise ServeError(f"{bundle} is not a model bundle (no metadata.json); {hint}.")
    model_json = bundle / "tfjs" / "model.json"
    if not model_json.is_file():
        raise ServeError(
            f"{bundle} has no tfjs/model.json, the browser model; {hint} "
            f"(pneumoscan export --model {bundle} --out BUNDLE_DIR, if it is "
            "a run folder) and serve BUNDLE_DIR."
        )
    metadata = metadata_io.read(bundle)
    try:
        manifest = json.loads(model_json.read_text(encoding="utf-8"))["weightsManifest"]
        shards = [name for group in manifest for name in group["paths"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ServeError(f"{model_json} cannot be read ({error}); {hint}.") from None
    routes = {
        "/model/metadata.json": Route(bundle / metadata_io.FILE_NAME, NO_CACHE),
        "/model/tfjs/model.json": Route(model_json, NO_CACHE),
    }
    for name in shards:
        path = bundle / "tfjs" / name
        if not metadata_io.TFJS_SHARD_NAME.fullmatch(name) or not path.is_file():
            raise ServeError(
                f"{model_json} lists weight file {name!r}, which is missing or misnamed; {hint}."
            )
        routes[f"/model/tfjs/{name}"] = Route(path, NO_CACHE)
    return routes, metadata


def build_routes(bundle: Path, node_modules: Path | None = None) -> tuple[dict[str, Route], dict]:
    """Every URL the server answers with a file, and the bundle's metadata."""
    routes, metadata = bundle_routes(bundle)
    for name, path in vendor_files(node_modules).items():
        routes[f"/vendor/{name}"] = Route(path, VENDOR_CACHE)
    routes["/"] = Route(WEB_DIR / "index.html", NO_CACHE)
    for path in sorted(WEB_DIR.iterdir()):
        if path.is_file() and path.suffix in MIME_TYPES:
            routes[f"/static/{path.name}"] = Route(path, NO_CACHE)
    return routes, metadata


class HostCheck:
    """Which `Host` headers the server answers: the loopback names and the `host` it listens on,
    with any port (an SSH tunnel or a container may publish it on another); when it listens on
    every address (0.0.0.0, ::), also this machine's names and any IP address (an address cannot
    be rebound by DNS, a name can)."""

    def __init__(self, host: str):
        self.names = {name.lower() for name in (*LOOPBACK_NAMES, host.strip("[]"))}
        self.any_address = host in WILDCARD_HOSTS
        if self.any_address:
            self.names |= {socket.gethostname().lower(), socket.getfqdn().lower()}

    def allows(self, values: list[str]) -> bool:
        """Whether a request with these `Host` header values (exactly one is right) is answered."""
        match = HOST_HEADER.fullmatch(values[0].strip().lower()) if len(values) == 1 else None
        if match is None:
            return False
        name = match[1].strip("[]")
        return name in self.names or (self.any_address and _is_address(name))


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class DeadlineReader(io.RawIOBase):
    """A connection's socket as a raw stream for `rfile`: a request's first byte may take the idle
    timeout to come, and the rest of its line and headers must follow within `request_timeout`
    of it, however slowly they trickle (`TimeoutError` closes the connection)."""

    def __init__(self, connection: socket.socket, idle_timeout: float, request_timeout: float):
        self.connection, self.idle_timeout, self.request_timeout = connection, idle_timeout, request_timeout
        self.deadline: float | None = None  # None until the request's first byte

    def readable(self) -> bool:
        return True

    def next_request(self) -> None:
        self.deadline = None
        self.connection.settimeout(self.idle_timeout)  # what the answer's writes get too

    def readinto(self, buffer) -> int:
        timeout = self.idle_timeout
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise TimeoutError(f"request not complete {self.request_timeout:g} s after its first byte")
        self.connection.settimeout(timeout)
        count = self.connection.recv_into(buffer)
        if self.deadline is None and count:
            self.deadline = time.monotonic() + self.request_timeout
        return count


def _unsafe(path: str) -> bool:
    """A request path that tries to leave its folder: `..`, backslashes, `//`, NUL bytes."""
    decoded = unquote(path)
    segments = decoded.split("/")[1:]
    return (
        not path.startswith("/")
        or path.startswith("//")
        or "\\" in decoded
        or "\x00" in decoded
        or any(part in (".", "..") for part in segments)
    )


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers GET and HEAD from the route table of its server; nothing else."""

    server_version = f"pneumoscan/{__version__}"
    protocol_version = "HTTP/1.1"  # keep-alive: a page's dozen requests share connections

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # socket timeout while waiting for a request
        super().setup()
        self.rfile.close()  # the socket's own reader: reads go through the request deadline
        self.reader = DeadlineReader(self.connection, self.server.idle_timeout, self.server.request_timeout)
        self.rfile = io.BufferedReader(self.reader)

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # reads the headers
        self.reader.next_request()
        return parsed

    def version_string(self) -> str:
        return self.server_version  # no Python version in the Server header

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def __getattr__(self, name: str):
        # Any other method (POST, PUT, DELETE, OPTIONS, made-up ones) -> 405, not 501.
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        self.send_response(405)
        self.send_header("Allow", "GET, HEAD")
        self._send_text_body("method not allowed\n", send_body=True, close=True)

    def end_headers(self) -> None:
        for name, value in self.server.response_headers.items():
            self.send_header(name, value)
        super().end_headers()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Plain-text errors (the default HTML page echoes the request line back).
        self.send_response(code, message)
        self._send_text_body(
            f"{code} {self.responses.get(code, ('error',))[0].lower()}\n",
            send_body=self.command != "HEAD",
            close=True,
        )

    def _send_text_body(self, text: str, send_body: bool, close: bool = False) -> None:
        body = text.encode("utf-8")
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", NO_CACHE)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _answer(self, send_body: bool) -> None:
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        if _unsafe(path):
            self.send_error(400)
            return
        if not self.server.host_check.allows(self.headers.get_all("Host") or []):
            self.send_error(421)  # not a name this server was started for: DNS rebinding, or a typo
            return
        if path == "/index.html":
            path = "/"
        if path == "/healthz":
            self._send_json(self.server.health, send_body)
            return
        route = self.server.routes.get(path)
        if route is None:
            self.send_error(404)
            return
        self._send_file(route, send_body)

    def _send_json(self, value: dict, send_body: bool) -> None:
        body = json.dumps(value).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _send_file(self, route: Route, send_body: bool) -> None:
        try:
            handle = route.path.open("rb")
        except OSError:  # removed or replaced since the server started (a new export)
            self.send_error(404)
            return
        with handle:
            stat = os.fstat(handle.fileno())
            etag = '"' + hashlib.sha1(f"{stat.st_mtime_ns}-{stat.st_size}".encode()).hexdigest()[:20] + '"'
            if etag in self.headers.get("If-None-Match", ""):
                self.send_response(304)
                self.send_header("ETag", etag)
                self.send_header("Cache-Control", route.cache_control)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", MIME_TYPES.get(route.path.suffix, "application/octet-stream"))
            self.send_header("Content-Length", str(stat.st_size))
            self.send_header("Cache-Control", route.cache_control)
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
            self.end_headers()
            if send_body:
                shutil.copyfileobj(handle, self.wfile, CHUNK_BYTES)

    def log_message(self, format: str, *args) -> None:
        # One line per request; control characters escaped so a request cannot forge lines.
        if not self.server.quiet:
            message = (format % args).translate(self._control_char_table)
            sys.stderr.write(f"{self.address_string()} [{self.log_date_time_string()}] {message}\n")


class Server(http.server.ThreadingHTTPServer):
    """A threaded HTTP server with the route table, health answer, host check, timeouts, a cap on
    connections and a log switch."""

    daemon_threads = True
    request_queue_size = REQUEST_QUEUE_SIZE

    def __init__(
        self,
        address: tuple[str, int],
        routes: dict[str, Route],
        health: dict,
        quiet: bool,
        idle_timeout: float = IDLE_TIMEOUT_S,
        request_timeout: float = REQUEST_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        cross_origin_isolated: bool = True,
    ):
        self.routes, self.health, self.quiet, self.idle_timeout = routes, health, quiet, idle_timeout
        self.response_headers = response_headers(cross_origin_isolated)
        self.request_timeout = request_timeout
        self.slots = threading.BoundedSemaphore(max_connections)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.host_check = HostCheck(address[0])

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):  # every slot taken: answer 503 without a thread
            try:
                request.setblocking(False)
                request.send(BUSY_ANSWER)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        # A browser closing a connection mid-download is normal; anything else is logged.
        error = sys.exc_info()[1]
        if not isinstance(error, (BrokenPipeError, ConnectionResetError, TimeoutError)):
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def make_server(
    bundle: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    quiet: bool = False,
    node_modules: Path | None = None,
    idle_timeout: float = IDLE_TIMEOUT_S,
    request_timeout: float = REQUEST_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
    cross_origin_isolated: bool = True,
) -> Server:
    """A server for `bundle`, bound but not yet serving (`port=0` picks a free port); a
    keep-alive connection silent for `idle_timeout` seconds is closed, and so is one whose
    request is not read `request_timeout` seconds after its first byte; at most
    `max_connections` are served at once. `cross_origin_isolated=False` leaves out COEP (the
    single-threaded baseline of benchmarks/speed/browser_bench.py; `serve` always sends it).

    Raises:
        ServeError: for a bundle without tfjs/model.json, missing TF.js npm files, or an
            address that cannot be listened on.
        MetadataError: if the bundle's metadata.json breaks the schema.
    """
    routes, metadata = build_routes(Path(bundle), node_modules)
    health = {
        "status": "ok",
        "model": metadata["arch"],
        "pneumoscan_version": __version__,
        "model_version": metadata["pneumoscan_version"],
        "created": metadata["created"],
        "input": [metadata["input"]["height"], metadata["input"]["width"]],
        "threshold": metadata["threshold"]["value"],
    }
    try:
        return Server(
            (host, port),
            routes,
            health,
            quiet,
            idle_timeout,
            request_timeout,
            max_connections,
            cross_origin_isolated,
        )
    except OSError as error:  # port taken, address not on this machine, no permission
        raise ServeError(
            f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --port or --host."
        ) from None


def start_in_thread(server: Server) -> threading.Thread:
    """Serve from a daemon thread (tests, benchmarks); stop with `server.shutdown()`."""
    thread = threading.Thread(target=server.serve_forever, name="pneumoscan-serve", daemon=True)
    thread.start()
    return thread


def serve(bundle: Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `bundle` until Ctrl-C."""
    server = make_server(bundle, host, port)
    print(f"Serving the {server.health['model']} model of {Path(bundle)} on {server.url}")
    print("Images are analysed in the browser and never sent here. Press Ctrl-C to stop.")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nStopped.")
    finally:
        server.server_close()

"""Tests for `pneumoscan.serve` (`pneumoscan serve`): routes, headers, and what it refuses.

A real server on 127.0.0.1 (port 0) in a thread serves a stand-in bundle (valid metadata,
a model.json naming two shards) and stand-in TF.js files, so no npm, browser or TensorFlow
is needed; tests/test_web.py runs the real thing in Chromium.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import http.client
import json
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from pneumoscan.metadata import MetadataError
from pneumoscan.serve import VENDOR_FILES, HostCheck, ServeError, make_server, start_in_thread, vendor_files

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "src" / "pneumoscan" / "web"
SHARDS = ["group1-shard1of2.bin", "group1-shard2of2.bin"]


def _metadata() -> dict:
    return {
        "schema_version": 1,
        "pneumoscan_version": "0.1.0",
        "created": "2026-01-01T00:00:00+00:00",
        "arch": "seed",
        "class_names": ["NORMAL", "PNEUMONIA"],
        "positive_class": "PNEUMONIA",
        "input": {
            "height": 64,
            "width": 64,
            "channels": 1,
            "dtype": "float32",
            "color_mode": "grayscale",
            "value_range": [0, 255],
        },
        "preprocessing": [],
        "output": {"activation": "sigmoid", "meaning": "p"},
        "calibration": {"method": "none", "slope": 1.0, "intercept": 0.0, "fitted_on": None},
        "threshold": {
            "value": 0.5,
            "rule": "fixed:0.5",
            "split": None,
            "applies_to": "calibrated probability",
        },
        "config": {},
        "data": {"rule": {}, "splits": {}},
        "training": {},
        "versions": {},
    }


def write_bundle(root: Path) -> Path:
    """A stand-in exported bundle: metadata.json, model.keras, tfjs/{model.json, shards}."""
    bundle = root / "bundle"
    (bundle / "tfjs").mkdir(parents=True)
    (bundle / "metadata.json").write_text(json.dumps(_metadata()))
    (bundle / "model.keras").write_bytes(b"KERAS-NOT-SERVED")
    model_json = {
        "format": "layers-model",
        "modelTopology": {},
        "weightsManifest": [{"paths": SHARDS, "weights": []}],
    }
    (bundle / "tfjs" / "model.json").write_text(json.dumps(model_json))
    for index, name in enumerate(SHARDS):
        (bundle / "tfjs" / name).write_bytes(bytes([index]) * 1000)
    return bundle


def write_node_modules(root: Path) -> Path:
    """Stand-ins for the allow-listed TF.js files, plus files that must never be served."""
    node_modules = root / "node_modules"
    for relative in VENDOR_FILES.values():
        path = node_modules / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"/* {path.name} */".encode())
    (node_modules / "@tensorflow" / "tfjs" / "package.json").write_text('{"name": "SECRET-PACKAGE"}')
    return node_modules


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    server = make_server(write_bundle(root), port=0, quiet=True, node_modules=write_node_modules(root))
    start_in_thread(server)
    yield server
    server.shutdown()
    server.server_close()


def request(server, path: str, method: str = "GET", headers: dict | None = None):
    """Send `path` exactly as written (no normalisation); returns (response, body)."""
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize(
    "path, content_type",
    [
        ("/", "text/html; charset=utf-8"),
        ("/?backend=wasm", "text/html; charset=utf-8"),
        ("/static/app.js", "text/javascript; charset=utf-8"),
        ("/static/preprocess.js", "text/javascript; charset=utf-8"),
        ("/static/style.css", "text/css; charset=utf-8"),
        ("/vendor/tf.es2017.min.js", "text/javascript; charset=utf-8"),
        ("/vendor/tf-backend-wasm.es2017.min.js", "text/javascript; charset=utf-8"),
        ("/vendor/tfjs-backend-wasm.wasm", "application/wasm"),
        ("/vendor/tfjs-backend-wasm-simd.wasm", "application/wasm"),
        ("/vendor/tfjs-backend-wasm-threaded-simd.wasm", "application/wasm"),
        ("/model/metadata.json", "application/json"),
        ("/model/tfjs/model.json", "application/json"),
        ("/model/tfjs/group1-shard1of2.bin", "application/octet-stream"),
        ("/model/tfjs/group1-shard2of2.bin", "application/octet-stream"),
        ("/healthz", "application/json"),
    ],
)
def test_content_types(server, path, content_type):
    response, body = request(server, path)
    assert response.status == 200
    assert response.getheader("Content-Type") == content_type
    assert int(response.getheader("Content-Length")) == len(body) > 0


def test_index_is_the_web_page(server):
    _, body = request(server, "/")
    assert body == (WEB / "index.html").read_bytes()


@pytest.mark.parametrize(
    "path, cache_control",
    [
        ("/", "no-cache"),
        ("/static/app.js", "no-cache"),
        ("/model/metadata.json", "no-cache"),
        ("/model/tfjs/model.json", "no-cache"),
        ("/model/tfjs/group1-shard1of2.bin", "no-cache"),
        ("/healthz", "no-store"),
        ("/vendor/tf.es2017.min.js", "public, max-age=604800"),
        ("/vendor/tfjs-backend-wasm-simd.wasm", "public, max-age=604800"),
    ],
)
def test_cache_headers(server, path, cache_control):
    response, _ = request(server, path)
    assert response.getheader("Cache-Control") == cache_control


@pytest.mark.parametrize("path", ["/", "/model/tfjs/model.json", "/missing", "/../pyproject.toml"])
def test_security_headers_on_every_answer(server, path):
    response, _ = request(server, path)
    assert response.getheader("X-Content-Type-Options") == "nosniff"
    policy = response.getheader("Content-Security-Policy")
    assert "default-src 'none'" in policy
    assert "script-src 'self' 'wasm-unsafe-eval'" in policy
    assert "img-src 'self' blob: data:" in policy
    assert "'unsafe-eval'" not in policy and "'unsafe-inline'" not in policy
    assert "frame-ancestors 'none'" in policy
    assert "Python" not in response.getheader("Server")
    # Cross-origin isolation: what lets TF.js' wasm threads share memory (issue 22).
    assert response.getheader("Cross-Origin-Opener-Policy") == "same-origin"
    assert response.getheader("Cross-Origin-Embedder-Policy") == "require-corp"
    assert response.getheader("Cross-Origin-Resource-Policy") == "same-origin"


def test_the_policy_allows_blob_scripts_for_wasm_threads_and_nothing_wider(server):
    """TF.js' threaded wasm build starts its workers from blob: URLs and imports its code into
    them from another (the worker inherits the page's policy): script-src needs blob:, and no
    directive may open anything else (no data: or remote scripts, no other origin anywhere)."""
    policy = request(server, "/")[0].getheader("Content-Security-Policy")
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["script-src"].split() == ["'self'", "'wasm-unsafe-eval'", "blob:"]
    assert "worker-src" not in directives and "child-src" not in directives  # script-src rules
    for name, sources in directives.items():
        allowed = set(sources.split()) - {"'self'", "'none'", "'wasm-unsafe-eval'", "blob:", "data:"}
        assert not allowed, (name, allowed)
        if name != "img-src":
            assert "data:" not in sources.split(), name


def test_a_server_without_isolation_leaves_out_coep_only(tmp_path):
    """browser_bench's single-threaded baseline: the same answers without COEP."""
    with running(tmp_path, cross_origin_isolated=False) as server:
        response, _ = request(server, "/")
    assert response.status == 200
    assert response.getheader("Cross-Origin-Embedder-Policy") is None
    assert response.getheader("Cross-Origin-Opener-Policy") == "same-origin"
    assert "blob:" in response.getheader("Content-Security-Policy")


def test_demo_serves_the_isolation_headers(tmp_path, monkeypatch, capsys):
    """`pneumoscan demo` (and `serve`) answer one request with the headers the page's threads need."""
    from pneumoscan import serve as serve_module
    from pneumoscan.cli import main

    answered = {}

    def serve_one(self):  # instead of serve_forever: one request, then back to the command
        self.handle_request()

    def ask(server):
        response, _ = request(server, "/")
        answered.update(response.getheaders())

    monkeypatch.setenv("PNEUMOSCAN_NODE_MODULES", str(write_node_modules(tmp_path)))
    monkeypatch.setattr(serve_module.Server, "serve_forever", serve_one)
    original = serve_module.make_server

    asking = []

    def make_and_ask(*args, **kwargs):
        server = original(*args, **kwargs)
        asking.append(threading.Thread(target=ask, args=[server]))
        asking[0].start()
        return server

    monkeypatch.setattr(serve_module, "make_server", make_and_ask)
    assert main(["demo", "--port", "0"]) == 0
    asking[0].join(10)
    assert answered["Cross-Origin-Opener-Policy"] == "same-origin"
    assert answered["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert "blob:" in answered["Content-Security-Policy"]


def test_healthz(server):
    response, body = request(server, "/healthz")
    health = json.loads(body)
    assert response.status == 200
    assert health["status"] == "ok" and health["model"] == "seed"
    assert health["input"] == [64, 64] and health["threshold"] == 0.5


def test_head_sends_headers_only(server):
    response, body = request(server, "/vendor/tf.es2017.min.js", method="HEAD")
    assert response.status == 200 and body == b""
    assert int(response.getheader("Content-Length")) == len("/* tf.es2017.min.js */")


def test_etag_revalidation(server):
    response, _ = request(server, "/model/tfjs/model.json")
    etag = response.getheader("ETag")
    again, body = request(server, "/model/tfjs/model.json", headers={"If-None-Match": etag})
    assert again.status == 304 and body == b""


@pytest.mark.parametrize(
    "path",
    [
        "/static/",
        "/static",
        "/vendor/",
        "/vendor",
        "/model/",
        "/model/tfjs/",
        "/model",
        "/missing",
        "/index.htm",
        "/vendor/package.json",
        "/vendor/tf.min.js.map",
        "/model/model.keras",
        "/model/tfjs/group1-shard3of3.bin",
        "/static/index.html.bak",
    ],
)
def test_not_found(server, path):
    response, body = request(server, path)
    assert response.status == 404
    assert b"KERAS-NOT-SERVED" not in body


# Each entry: a path that tries to reach a file outside the routes, and text of that file.
TRAVERSALS = [
    ("/../pyproject.toml", b"[build-system]"),
    ("/static/../../../pyproject.toml", b"[build-system]"),
    ("/vendor/..%2f..%2fpackage.json", b"SECRET-PACKAGE"),
    ("/vendor/%2e%2e/%2e%2e/@tensorflow/tfjs/package.json", b"SECRET-PACKAGE"),
    ("/vendor/..%5c..%5c@tensorflow%5ctfjs%5cpackage.json", b"SECRET-PACKAGE"),
    ("/vendor/..\\..\\@tensorflow\\tfjs\\package.json", b"SECRET-PACKAGE"),
    ("/model/../../etc/passwd", b"root:"),
    ("/model/tfjs/../model.keras", b"KERAS-NOT-SERVED"),
    ("/model/tfjs/..%2fmodel.keras", b"KERAS-NOT-SERVED"),
    ("//etc/passwd", b"root:"),
    ("/static/%2e%2e/%2e%2e/pyproject.toml", b"[build-system]"),
    ("/static/%2E%2E/%2E%2E/pyproject.toml", b"[build-system]"),
    ("/static/app.js%00.html", b"import"),
    ("/etc/passwd", b"root:"),
    ("http://127.0.0.1/../pyproject.toml", b"[build-system]"),
]


@pytest.mark.parametrize("path, secret", TRAVERSALS)
def test_path_traversal_never_serves_files(server, path, secret):
    response, body = request(server, path)
    assert response.status in (400, 404)
    assert secret not in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW"])
def test_only_get_and_head(server, method):
    response, _ = request(server, "/", method=method)
    assert response.status == 405
    assert response.getheader("Allow") == "GET, HEAD"


def test_bundle_without_tfjs_is_refused(tmp_path):
    bundle = write_bundle(tmp_path)
    (bundle / "tfjs" / "model.json").unlink()
    with pytest.raises(ServeError, match="run pneumoscan export first"):
        make_server(bundle, port=0, node_modules=write_node_modules(tmp_path))


def test_folder_that_is_not_a_bundle_is_refused(tmp_path):
    with pytest.raises(ServeError, match=r"not a model bundle.*run pneumoscan export first"):
        make_server(tmp_path, port=0, node_modules=write_node_modules(tmp_path))


def test_missing_shard_is_refused(tmp_path):
    bundle = write_bundle(tmp_path)
    (bundle / "tfjs" / SHARDS[1]).unlink()
    with pytest.raises(ServeError, match=f"{SHARDS[1]}.*run pneumoscan export first"):
        make_server(bundle, port=0, node_modules=write_node_modules(tmp_path))


def test_invalid_metadata_is_refused(tmp_path):
    bundle = write_bundle(tmp_path)
    (bundle / "metadata.json").write_text(json.dumps({**_metadata(), "schema_version": 2}))
    with pytest.raises(MetadataError, match="schema_version"):
        make_server(bundle, port=0, node_modules=write_node_modules(tmp_path))


def test_missing_tfjs_files_say_run_npm_ci(tmp_path, monkeypatch):
    bundle = write_bundle(tmp_path)
    monkeypatch.setenv("PNEUMOSCAN_NODE_MODULES", str(tmp_path / "empty"))
    missing = r"the page's npm files \(TF.js, dicom-parser\) are missing: run `npm ci` \(or `make demo`\)"
    with pytest.raises(ServeError, match=missing):
        make_server(bundle, port=0)


def test_node_modules_from_environment(tmp_path, monkeypatch):
    node_modules = write_node_modules(tmp_path)
    monkeypatch.setenv("PNEUMOSCAN_NODE_MODULES", str(node_modules))
    assert vendor_files() == {name: node_modules / relative for name, relative in VENDOR_FILES.items()}


def test_port_in_use_is_a_clear_error(server, tmp_path):
    port = server.server_address[1]
    with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port}"):
        make_server(write_bundle(tmp_path), port=port, node_modules=write_node_modules(tmp_path))


# ---- connections: keep-alive, idle timeout, many clients at once ---------------------------

CLIENTS = 50


def test_keep_alive_serves_many_requests_on_one_connection(server):
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        for path in ["/", "/static/app.js", "/healthz", "/model/metadata.json", "/model/tfjs/model.json"]:
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            assert response.status == 200 and response.getheader("Connection") != "close"
            if path == "/":
                first_socket = connection.sock
            assert connection.sock is first_socket  # the same TCP connection every time
    finally:
        connection.close()


@contextlib.contextmanager
def running(root: Path, **options):
    """A stand-in bundle served from a thread on a free port with `options` (make_server's)."""
    server = make_server(
        write_bundle(root), port=0, quiet=True, node_modules=write_node_modules(root), **options
    )
    start_in_thread(server)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def quick_server(tmp_path):
    """A server whose idle connections are closed after 0.5 s."""
    with running(tmp_path, idle_timeout=0.5) as server:
        yield server


@pytest.mark.parametrize("requests", [0, 2], ids=["silent from the start", "after two requests"])
def test_idle_connection_is_closed_after_the_idle_timeout(quick_server, requests):
    host, port = quick_server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.connect()
        for _ in range(requests):  # kept alive between them
            connection.request("GET", "/healthz")
            assert connection.getresponse().read().startswith(b"{")
        started = time.monotonic()
        assert connection.sock.recv(1) == b""  # closed by the server, not by our 10 s timeout
        assert time.monotonic() - started < 5
    finally:
        connection.close()


def test_backlog_holds_many_connections_while_the_server_is_busy(tmp_path):
    """Fifty clients connect at once while no thread is accepting (a busy server): every
    connection is queued by the kernel (listen backlog), none waits for a SYN retry, and each
    is then served."""
    server = make_server(
        write_bundle(tmp_path), port=0, quiet=True, node_modules=write_node_modules(tmp_path)
    )
    clients = [socket.socket(server.address_family, socket.SOCK_STREAM) for _ in range(CLIENTS)]
    serving = False
    try:
        for client in clients:
            client.setblocking(False)
            assert client.connect_ex(server.server_address[:2]) in (0, errno.EINPROGRESS)
        # A dropped SYN is retried after 1 s: within 0.9 s only the queued ones are connected.
        deadline, pending = time.monotonic() + 0.9, set(clients)
        while pending and time.monotonic() < deadline:
            _, connected, _ = select.select([], list(pending), [], 0.05)
            pending -= set(connected)
        assert len(pending) == 0, f"{len(pending)} of {CLIENTS} connections were not queued"
        start_in_thread(server)
        serving = True
        for client in clients:
            client.setblocking(True)
            client.settimeout(10)
            host = f"127.0.0.1:{server.server_address[1]}".encode()
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        for client in clients:
            assert _read_all(client).startswith(b"HTTP/1.1 200 OK")
    finally:
        for client in clients:
            client.close()
        if serving:  # shutdown() waits for serve_forever(), forever if it never ran
            server.shutdown()
        server.server_close()


def test_fifty_concurrent_clients_are_all_served(server):
    """No connection refused or reset with CLIENTS at once (not timed: benchmarks/scale/serve_load.py
    measures the latencies)."""

    def fetch(index: int) -> int:
        response, body = request(server, "/static/app.js" if index % 2 else "/healthz")
        assert len(body) == int(response.getheader("Content-Length"))
        return response.status

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        assert list(pool.map(fetch, range(CLIENTS))) == [200] * CLIENTS


def test_trickled_headers_are_cut_off_after_the_request_timeout(tmp_path):
    """Clients sending a header line every 0.2 s (each within the 0.5 s idle timeout) are all
    closed about 1 s after their first byte, not held for as long as they trickle."""
    with running(tmp_path, idle_timeout=0.5, request_timeout=1.0) as server:
        clients = [socket.create_connection(server.server_address[:2], timeout=10) for _ in range(20)]
        try:
            started, open_ = time.monotonic(), set(clients)
            for client in clients:
                client.sendall(b"GET / HTTP/1.1\r\n")
            while open_ and time.monotonic() - started < 6:
                for client in list(open_):
                    try:
                        client.sendall(b"X-Slow: 1\r\n")
                    except OSError:  # reset: the server has closed it
                        open_.discard(client)
                closed, _, _ = select.select(list(open_), [], [], 0.2)
                for client in closed:  # readable: end of stream (or a reset), never an answer
                    with contextlib.suppress(ConnectionResetError):
                        assert client.recv(4096) == b""
                    open_.discard(client)
            assert not open_, f"{len(open_)} of {len(clients)} trickling clients still open after 6 s"
            assert time.monotonic() - started < 4
        finally:
            for client in clients:
                client.close()


def test_connections_beyond_the_cap_get_503_and_the_rest_are_served(tmp_path):
    with running(tmp_path, max_connections=2) as server:
        address = server.server_address[:2]
        held = [socket.create_connection(address, timeout=10) for _ in range(2)]  # silent: a thread each
        try:
            extra = socket.create_connection(address, timeout=10)
            busy = _read_all(extra)
            assert busy.startswith(b"HTTP/1.1 503 Service Unavailable")
            assert b"\r\nCross-Origin-Embedder-Policy: require-corp\r\n" in busy  # every answer
            assert busy.endswith(b"\r\n\r\n503 server busy\n")
            extra.close()
            held.pop().close()  # frees a slot once the server sees the end of the stream
            deadline, status = time.monotonic() + 5, None
            while status != 200 and time.monotonic() < deadline:
                with contextlib.suppress(ConnectionError):  # a 503 can arrive as a reset
                    status = request(server, "/healthz")[0].status
                time.sleep(0.05)
            assert status == 200
        finally:
            for client in held:
                client.close()


FOREIGN_HOSTS = [
    "evil.example:{port}",
    "evil.example",
    "localhost.evil.example:{port}",
    "127.0.0.1.evil.example:{port}",
    "127.0.0.1:{port}@evil.example",
    "127.0.0.1:{port}/",
    "",
]


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
@pytest.mark.parametrize(
    "path", ["/", "/model/metadata.json", "/model/tfjs/group1-shard1of2.bin", "/healthz"]
)
def test_a_foreign_host_gets_nothing_of_the_model(server, host, path):
    """What a page on another site reaches through DNS rebinding: 421 and no byte of the model."""
    port = server.server_address[1]
    response, body = request(server, path, headers={"Host": host.format(port=port)})
    assert response.status == 421
    assert body == b"421 misdirected request\n"


def test_two_host_headers_are_refused(server):
    port = server.server_address[1]
    response, _ = request(server, "/model/metadata.json", headers={"Host": f"127.0.0.1:{port}"})
    assert response.status == 200
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.putrequest("GET", "/model/metadata.json")  # adds the right Host
        connection.putheader("Host", "evil.example")
        connection.endheaders()
        assert connection.getresponse().status == 421
    finally:
        connection.close()


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:{port}",
        "localhost:{port}",
        "LocalHost:{port}",
        "[::1]:{port}",
        "localhost:9000",
        "localhost",
    ],
)
def test_the_names_the_server_was_started_for_are_answered(server, host):
    response, body = request(
        server, "/model/metadata.json", headers={"Host": host.format(port=server.server_address[1])}
    )
    assert response.status == 200 and json.loads(body)["arch"] == "seed"


@pytest.mark.parametrize(
    "bound, header, allowed",
    [
        ("127.0.0.1", "localhost", True),
        ("127.0.0.1", "localhost:9000", True),  # an SSH tunnel's port
        ("127.0.0.1", "192.168.1.5:8000", False),
        ("127.0.0.1", "localhost:port", False),
        ("scanner.hospital.example", "Scanner.Hospital.Example:8000", True),
        ("scanner.hospital.example", "evil.example:8000", False),
        ("0.0.0.0", "192.168.1.5:8000", True),  # an address cannot be rebound
        ("0.0.0.0", "[fe80::1]:8000", True),
        ("0.0.0.0", "evil.example:8000", False),
        ("::", "localhost:8000", True),
        ("::1", "[::1]:8000", True),
        ("::1", "::1:8000", False),
    ],
)
def test_host_check(bound, header, allowed):
    assert HostCheck(bound).allows([header]) is allowed


def _read_all(client: socket.socket) -> bytes:
    chunks = []
    while chunk := client.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)

"""The scoring server (``passerelle serve``): MLflow's scoring protocol over a verified model.

Endpoints, as MLflow's own scoring server (``mlflow/pyfunc/scoring_server``) has them:

* ``GET /ping``, ``GET /health``: 200 with body ``"\\n"`` while the model is served; 503
  with a JSON error once a check refused it (withdrawn, tampered, key revoked);
* ``GET /version``: the MLflow version string (``mlflow.version.VERSION``);
* ``POST /invocations`` with ``Content-Type: application/json`` (charset utf-8 only, else
  415) and exactly one of ``dataframe_records`` (a list of row objects),
  ``dataframe_split`` (``{"columns", "data"}``), ``instances`` or ``inputs`` (a list of
  rows, or of letter texts, or columns as ``{column: [values]}``); a row is a stay:
  ``sections`` (object), or the section names as columns, or ``text``, and an optional
  ``stay_id``. The answer is ``{"predictions": [{"stay_id", "codes": [{"code", "label",
  "probability"}]}]}``; errors are MLflow's ``{"error_code", "message"}`` with a 4xx
  status (400 malformed, 411 no length, 413 too large, 415 content type, 404 path).

Bounds: a request body over ``max_request_bytes`` is refused before it is read, a request
with more than ``max_stays`` stays is refused, and every socket read or write times out
after ``timeout`` seconds. Each request is logged as one line (method, path, status,
number of stays, bytes, latency): never a letter, a code or a stay id.

Checks: :func:`transfer.deploy.verify_version` runs before the port is opened and again
every ``check_interval`` seconds (the site policy's ``deploy.check_interval_seconds``,
default 30, or shorter; and on SIGHUP in the command line): the model is
reloaded from the verified bytes, or, if a check refuses, the server stops serving it
(503) until a later check passes. A withdrawal received while the server runs therefore
takes effect within ``check_interval`` seconds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from passerelle.errors import BadInput, PasserelleError
from registry.store import ModelStore, VersionRef
from transfer.acts import recorder
from transfer.coding import record_use
from transfer.scoring import Coder, MalformedStay, check_top_k, load_verified, parse_stay

log = logging.getLogger("passerelle.serve")

DF_RECORDS, DF_SPLIT, INSTANCES, INPUTS = ("dataframe_records", "dataframe_split",
                                          "instances", "inputs")
FORMATS = (DF_RECORDS, DF_SPLIT, INSTANCES, INPUTS)
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_MAX_STAYS = 1024
DEFAULT_TIMEOUT = 10.0
MIN_CHECK_INTERVAL, MAX_CHECK_INTERVAL = 0.5, 600.0
POLICY_CHECK_INTERVAL = "deploy.check_interval_seconds"


@dataclass(frozen=True)
class ServeOptions:
    port: int
    host: str = "127.0.0.1"
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_stays: int = DEFAULT_MAX_STAYS
    timeout: float = DEFAULT_TIMEOUT
    check_interval: float = 30.0
    top_k: int = 5

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise BadInput(f"port {self.port} is not between 0 and 65535")
        if not 1024 <= self.max_request_bytes <= 64 << 20:
            raise BadInput("the request size bound must be between 1 KiB and 64 MiB")
        if not 1 <= self.max_stays <= 100_000:
            raise BadInput("the stays bound must be between 1 and 100000")
        if not 0.1 <= self.timeout <= 600:
            raise BadInput("the timeout must be between 0.1 and 600 seconds")
        if not MIN_CHECK_INTERVAL <= self.check_interval <= MAX_CHECK_INTERVAL:
            raise BadInput(f"the check interval must be between {MIN_CHECK_INTERVAL:g} and "
                           f"{MAX_CHECK_INTERVAL:g} seconds")
        check_top_k(self.top_k)


def check_interval(home: Path, requested: float | None) -> float:
    """The interval between checks: the site's ``deploy.check_interval_seconds``, or a
    shorter one asked for (a flag never lengthens the time a withdrawal takes)."""
    from transfer.site_policy import load_policy

    limit = load_policy(home).real(POLICY_CHECK_INTERVAL)
    if requested is None:
        return limit
    if requested > limit:
        raise BadInput(f"--check-interval {requested:g} is longer than the site's "
                       f"{POLICY_CHECK_INTERVAL} ({limit:g} s); it may only be shortened")
    return requested


class RequestError(Exception):
    """A request the server answers with a 4xx and MLflow's JSON error body."""

    def __init__(self, status: HTTPStatus, message: str,
                 code: str = "BAD_REQUEST") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def rows_of(payload: Any) -> list[Any]:
    """The rows of an MLflow scoring payload (exactly one of the four formats)."""
    if not isinstance(payload, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "The input must be a JSON dictionary "
                           f"with exactly one of the input fields {set(FORMATS)}")
    keys = [k for k in FORMATS if k in payload]
    if len(keys) != 1:
        raise RequestError(HTTPStatus.BAD_REQUEST, "The input must be a JSON dictionary "
                           f"with exactly one of the input fields {set(FORMATS)}; received "
                           f"{sorted(str(k) for k in payload)[:8]}")
    data = payload[keys[0]]
    if keys[0] == DF_SPLIT:
        if not isinstance(data, dict) or not isinstance(data.get("columns"), list) or \
                not isinstance(data.get("data"), list):
            raise RequestError(HTTPStatus.BAD_REQUEST,
                               "dataframe_split needs 'columns' and 'data' lists")
        columns = data["columns"]
        rows = []
        for row in data["data"]:
            if not isinstance(row, list) or len(row) != len(columns):
                raise RequestError(HTTPStatus.BAD_REQUEST,
                                   "each dataframe_split row needs one value per column")
            rows.append(dict(zip(columns, row, strict=True)))
        return rows
    if keys[0] in (INSTANCES, INPUTS) and isinstance(data, dict):  # columnar
        columns = list(data)
        values = [data[c] for c in columns]
        if not all(isinstance(v, list) for v in values) or len({len(v) for v in values}) > 1:
            raise RequestError(HTTPStatus.BAD_REQUEST,
                               f"{keys[0]} as columns needs lists of equal length")
        return [dict(zip(columns, row, strict=True)) for row in zip(*values, strict=True)]
    if not isinstance(data, list):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{keys[0]} must be a list of rows")
    return data


class _State:
    """The coder being served, or why nothing is served; swapped atomically."""

    def __init__(self, coder: Coder) -> None:
        self._lock = threading.Lock()
        self._coder: Coder | None = coder
        self._refusal: str | None = None

    def get(self) -> tuple[Coder | None, str | None]:
        with self._lock:
            return self._coder, self._refusal

    def serve(self, coder: Coder) -> None:
        with self._lock:
            self._coder, self._refusal = coder, None

    def refuse(self, reason: str) -> None:
        with self._lock:
            self._coder, self._refusal = None, reason


class ScoringServer:
    """A threaded HTTP server on ``host:port`` serving one verified version."""

    def __init__(self, store_factory: Callable[[], ModelStore], ref: VersionRef,
                 options: ServeOptions) -> None:
        self._store_factory = store_factory
        self.ref = ref
        self.options = options
        self._state = _State(load_verified(store_factory(), ref))  # before the port opens
        self._stop = threading.Event()
        self._wake = threading.Event()
        handler = _handler_class(self)
        try:
            self._httpd = ThreadingHTTPServer((options.host, options.port), handler)
        except OSError as e:
            raise BadInput(f"cannot listen on {options.host}:{options.port}: "
                           f"{e.strerror or e}") from e
        self._httpd.daemon_threads = True
        self._threads: list[threading.Thread] = []
        coder = self._state.get()[0]
        store = store_factory()
        try:
            with recorder(store.home) as rec:
                if coder is not None:
                    record_use(rec, coder, "serve", {
                        "host": options.host, "port": self.port,
                        "check_interval": options.check_interval})
        except BaseException:
            self._httpd.server_close()
            raise

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def state(self) -> tuple[Coder | None, str | None]:
        return self._state.get()

    def check(self) -> str | None:
        """Verify the version again and reload it; returns the refusal, or None."""
        try:
            coder = load_verified(self._store_factory(), self.ref)
        except PasserelleError as e:
            reason = " ".join(str(e).split())
            if self._state.get()[1] != reason:
                log.warning("check refused %s: stopped serving it: %s", self.ref, reason)
            self._state.refuse(reason)
            return reason
        if self._state.get()[1] is not None:
            log.warning("check passed for %s: serving it again", self.ref)
        self._state.serve(coder)
        return None

    def check_soon(self) -> None:
        """Run a check now (SIGHUP)."""
        self._wake.set()

    def _checker(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.options.check_interval)
            self._wake.clear()
            if not self._stop.is_set():
                self.check()

    def start(self) -> None:
        """Serve and check in background threads."""
        for target, name in ((self._httpd.serve_forever, "passerelle-http"),
                             (self._checker, "passerelle-check")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    # -- one request ------------------------------------------------------------------

    def invoke(self, content_type: str | None, body: bytes) -> tuple[int, bytes]:
        """(number of stays, response body) for an /invocations body."""
        coder, refusal = self._state.get()
        if coder is None:
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE,
                               f"{self.ref} is not served: {refusal}",
                               "TEMPORARILY_UNAVAILABLE")
        mime, _, params = (content_type or "").partition(";")
        if mime.strip().lower() != "application/json":
            raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                               "This predictor only supports application/json; got "
                               f"{(content_type or 'none')[:80]!r}", "BAD_REQUEST")
        for pair in filter(None, (p.strip() for p in params.split(";"))):
            key, _, value = pair.partition("=")
            if key.strip().lower() != "charset" or value.strip().lower() != "utf-8":
                raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                                   "The scoring server only supports UTF-8")
        try:
            payload = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise RequestError(HTTPStatus.BAD_REQUEST,
                               "Ensure that input is a valid JSON formatted string") from e
        rows = rows_of(payload)
        if len(rows) > self.options.max_stays:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"{len(rows)} stays in one request; at most "
                               f"{self.options.max_stays}")
        try:
            stays = [parse_stay(r, f"row {i}", coder.sections) for i, r in enumerate(rows)]
        except MalformedStay as e:
            raise RequestError(HTTPStatus.BAD_REQUEST, str(e)) from e
        rows = coder.code_json(stays, self.options.top_k)
        return len(stays), ('{"predictions":[' + ",".join(rows) + "]}").encode()


def _handler_class(server: ScoringServer) -> type[BaseHTTPRequestHandler]:
    from mlflow.version import VERSION

    class Handler(BaseHTTPRequestHandler):
        timeout = server.options.timeout  # every socket read and write
        disable_nagle_algorithm = True  # headers and a small body: no 40 ms delayed ACK
        protocol_version = "HTTP/1.1"
        server_version = "passerelle-serve"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request, below, without the request line's query

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, e: RequestError) -> None:
            doc = {"error_code": e.code, "message": str(e)}
            self._send(e.status, json.dumps(doc).encode(), "application/json")

        def _log(self, status: int, stays: int, size: int, started: float) -> None:
            log.info("%s %s %d stays=%d bytes=%d %.1f ms", self.command,
                     self.path.split("?")[0][:64], status, stays, size,
                     (time.perf_counter() - started) * 1000)

        def do_GET(self) -> None:
            started = time.perf_counter()
            path = self.path.split("?")[0]
            status = HTTPStatus.OK
            if path in ("/ping", "/health"):
                refusal = server.state[1]
                if refusal is None:
                    self._send(status, b"\n", "application/json")
                else:
                    status = HTTPStatus.SERVICE_UNAVAILABLE
                    self._error(RequestError(status, f"{server.ref} is not served: "
                                             f"{refusal}", "TEMPORARILY_UNAVAILABLE"))
            elif path == "/version":
                self._send(status, VERSION.encode(), "application/json")
            else:
                status = HTTPStatus.NOT_FOUND
                self._error(RequestError(status, f"no endpoint {path[:64]}",
                                         "ENDPOINT_NOT_FOUND"))
            self._log(status, 0, 0, started)

        def do_POST(self) -> None:
            started = time.perf_counter()
            stays, size = 0, 0
            try:
                if self.path.split("?")[0] != "/invocations":
                    raise RequestError(HTTPStatus.NOT_FOUND, "no endpoint "
                                       f"{self.path.split('?')[0][:64]}", "ENDPOINT_NOT_FOUND")
                size = self._length()
                body = self.rfile.read(size)
                if len(body) != size:
                    raise RequestError(HTTPStatus.BAD_REQUEST, "the body is shorter than "
                                       "its Content-Length")
                stays, answer = server.invoke(self.headers.get("Content-Type"), body)
                self._send(HTTPStatus.OK, answer, "application/json")
                status = int(HTTPStatus.OK)
            except RequestError as e:
                self.close_connection = True  # an unread body must not be parsed as a request
                self._error(e)
                status = int(e.status)
            except TimeoutError:
                self.close_connection = True
                status = int(HTTPStatus.REQUEST_TIMEOUT)
            self._log(status, stays, size, started)

        def _length(self) -> int:
            text = self.headers.get("Content-Length")
            if text is None or not text.isdigit():
                raise RequestError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length is required")
            size = int(text)
            if size > server.options.max_request_bytes:
                raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                   f"request of {size} bytes; at most "
                                   f"{server.options.max_request_bytes}")
            return size

    return Handler

"""`metricmill receive`: an ASGI app that takes pushed metrics and lands them for the ingest flow.

Routes: ``POST /api/v1/write`` (Prometheus remote write 1.0), ``POST /api/v2/write`` and
``POST /write`` (InfluxDB 2 and 1.x line protocol), ``POST /v1/metrics`` (OTLP/HTTP, protobuf or
JSON), ``GET /-/ready`` and ``GET /-/stats``.

A request is answered 2xx only once its samples are in a landing file (storage/push_landing.py:
temp name, fsync, rename, directory fsync). Before any work: 401 without the bearer token (when
one is configured), 413 for a body above ``receive_max_request_bytes`` (before or after
decompression), 429 with ``Retry-After`` while the landing backlog is above
``receive_max_backlog_bytes``. A body that cannot be decoded gets 400 with one line of reason.
At most ``receive_concurrency`` bodies are decoded and landed at once (the rest wait their
turn), and uvicorn answers 503 beyond ``receive_max_connections`` open requests.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread
import cramjam
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from metricmill.errors import MetricmillError
from metricmill.settings import Settings, secret_setting
from storage.otlp import decode_otlp
from storage.push_decode import BadPush, decode_line_protocol, decode_remote_write
from storage.push_landing import BacklogGauge, PushBatch, land_batch, remove_stale_temp_files

log = logging.getLogger("metricmill.receive")

_OTLP_IGNORED_AS_REJECTED = (
    "delta_points",
    "exponential_histogram_points",
    "no_recorded_value",
    "malformed_histograms",
)


class _Refused(Exception):
    """An answer other than success, decided before or while reading the body."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


def load_token(settings: Settings) -> str | None:
    """The bearer token: METRICMILL_RECEIVE_TOKEN, else the Prefect Secret block it names."""
    try:
        token = secret_setting(settings.receive_token, settings.receive_token_block)
    except ValueError as exc:
        raise MetricmillError(str(exc)) from None
    if token is None and settings.receive_token_block:
        raise MetricmillError(f"Secret block {settings.receive_token_block!r} is empty")
    return token


@dataclass
class Receiver:
    """The receiver's state: settings, token, backlog gauge, work limiter and counters."""

    settings: Settings
    token: str | None

    def __post_init__(self) -> None:
        self.landing = self.settings.landing
        self.backlog = BacklogGauge(self.landing)
        self.stats: Counter[str] = Counter()
        self._limiter: anyio.CapacityLimiter | None = None
        self._busy = 0
        self._busy_lock = threading.Lock()

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:  # created inside the server's event loop
            self._limiter = anyio.CapacityLimiter(self.settings.receive_concurrency)
        return self._limiter

    def prepare(self) -> None:
        """Create the landing directory; drop temp files of receivers that died mid-write."""
        self.landing.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_temp_files(self.landing)
        if removed:
            log.warning("removed %d unfinished temp file(s) of a receiver that died", removed)

    # -- checks before the work ---------------------------------------------------------------
    def _authorise(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() not in ("bearer", "token") or not hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            raise _Refused(401, "missing or wrong token", {"WWW-Authenticate": "Bearer"})

    def _check_backlog(self) -> None:
        waiting = self.backlog.current()
        if waiting > self.settings.receive_max_backlog_bytes:
            raise _Refused(
                429,
                f"landing backlog is {waiting} bytes, above receive_max_backlog_bytes; retry later",
                {"Retry-After": str(self.settings.receive_retry_after_seconds)},
            )

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.receive_max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _Refused(413, f"body of {declared} bytes is above receive_max_request_bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _Refused(413, "body is above receive_max_request_bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    # -- one request ----------------------------------------------------------------------------
    async def handle(
        self,
        request: Request,
        decode: Callable[[bytes], PushBatch],
        *,
        encodings: tuple[str, ...],
        default_encoding: str = "identity",
        reply: Callable[[PushBatch], Response] | None = None,
    ) -> Response:
        try:
            self._authorise(request)
            encoding = request.headers.get("content-encoding", default_encoding).strip().lower()
            if encoding not in encodings:
                raise _Refused(415, f"content encoding {encoding!r} is not accepted here")
            self._check_backlog()
            body = await self._read_body(request)
            batch, landed = await anyio.to_thread.run_sync(
                self._work, body, encoding, decode, limiter=self.limiter
            )
        except _Refused as refused:
            self.stats[f"refused_{refused.status}"] += 1
            return PlainTextResponse(
                refused.reason + "\n", status_code=refused.status, headers=refused.headers
            )
        except ClientDisconnect:
            self.stats["client_disconnects"] += 1
            return Response(status_code=400)
        if landed:
            self.backlog.add(landed)
        self.stats["requests_accepted"] += 1
        self.stats["samples_accepted"] += batch.samples
        self.stats["lines_rejected"] += len(batch.rejected)
        for what, count in batch.ignored.items():
            self.stats[f"ignored_{what}"] += count
        return reply(batch) if reply is not None else Response(status_code=204)

    def _work(
        self, body: bytes, encoding: str, decode: Callable[[bytes], PushBatch]
    ) -> tuple[PushBatch, int]:
        """Decompress, decode and land one body (in a worker thread); the bytes landed."""
        with self._busy_lock:
            self._busy += 1
            self.stats["peak_concurrent_work"] = max(self.stats["peak_concurrent_work"], self._busy)
        try:
            return self._decode_and_land(body, encoding, decode)
        finally:
            with self._busy_lock:
                self._busy -= 1

    def _decode_and_land(
        self, body: bytes, encoding: str, decode: Callable[[bytes], PushBatch]
    ) -> tuple[PushBatch, int]:
        raw = self._decompress(body, encoding)
        try:
            batch = decode(raw)
        except BadPush as exc:
            raise _Refused(400, str(exc)) from None
        try:
            landed = land_batch(batch, self.landing)
        except OSError as exc:
            log.error("cannot land a batch in %s: %s", self.landing, exc)
            raise _Refused(503, f"cannot write the landing directory: {exc.strerror}") from None
        return batch, (landed.size if landed else 0)

    def _decompress(self, body: bytes, encoding: str) -> bytes:
        limit = self.settings.receive_max_request_bytes
        if encoding == "identity":
            return body
        if encoding == "snappy":
            try:
                size = cramjam.snappy.decompress_raw_len(body)
            except Exception:  # cramjam raises its own error types for a bad header
                raise _Refused(400, "body is not snappy (block format) compressed") from None
            if size > limit:
                raise _Refused(413, f"body decompresses to {size} bytes, above the limit")
            try:
                return bytes(cramjam.snappy.decompress_raw(body))
            except Exception:
                raise _Refused(400, "body is not valid snappy (block format) data") from None
        return _gunzip(body, limit)


def _gunzip(body: bytes, limit: int) -> bytes:
    """gzip members (one or more) decompressed, refusing more than `limit` bytes of output."""
    out: list[bytes] = []
    size = 0
    data = body
    try:
        while data:
            member = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
            chunk = member.decompress(data, limit + 1 - size)
            size += len(chunk)
            if size > limit:
                raise _Refused(413, "body decompresses to more than receive_max_request_bytes")
            out.append(chunk)
            if not member.eof:
                raise _Refused(400, "gzip body is truncated")
            data = member.unused_data
    except zlib.error as exc:
        raise _Refused(400, f"body is not valid gzip: {exc}") from None
    return b"".join(out)


def _otlp_reply(json: bool) -> Callable[[PushBatch], Response]:
    def reply(batch: PushBatch) -> Response:
        response = ExportMetricsServiceResponse()
        rejected = sum(batch.ignored.get(k, 0) for k in _OTLP_IGNORED_AS_REJECTED)
        if rejected:
            response.partial_success.rejected_data_points = rejected
            response.partial_success.error_message = "not stored: " + ", ".join(
                f"{batch.ignored[k]} {k}" for k in _OTLP_IGNORED_AS_REJECTED if batch.ignored.get(k)
            )
        if json:
            return Response(
                json_format.MessageToJson(response, indent=None), media_type="application/json"
            )
        return Response(response.SerializeToString(), media_type="application/x-protobuf")

    return reply


def build_app(receiver: Receiver) -> Starlette:
    """The ASGI app serving `receiver`."""

    async def remote_write(request: Request) -> Response:
        return await receiver.handle(
            request, decode_remote_write, encodings=("snappy",), default_encoding="snappy"
        )

    def influx(bucket_param: str) -> Callable[[Request], Any]:
        async def write(request: Request) -> Response:
            bucket = request.query_params.get(bucket_param, "")
            precision = request.query_params.get("precision", "ns")
            if not bucket:
                return PlainTextResponse(
                    f"the {bucket_param!r} query parameter is required\n", status_code=400
                )
            return await receiver.handle(
                request,
                lambda body: decode_line_protocol(body, bucket=bucket, precision=precision),
                encodings=("identity", "gzip"),
            )

        return write

    async def otlp(request: Request) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ("application/x-protobuf", "application/json"):
            return PlainTextResponse(
                "content type must be application/x-protobuf or application/json\n",
                status_code=415,
            )
        json = content_type == "application/json"
        return await receiver.handle(
            request,
            lambda body: decode_otlp(body, json=json),
            encodings=("identity", "gzip"),
            reply=_otlp_reply(json),
        )

    async def ready(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def stats(request: Request) -> Response:
        return JSONResponse(
            {**receiver.stats, "backlog_bytes": receiver.backlog.current()},
        )

    return Starlette(
        routes=[
            Route("/api/v1/write", remote_write, methods=["POST"]),
            Route("/api/v2/write", influx("bucket"), methods=["POST"]),
            Route("/write", influx("db"), methods=["POST"]),
            Route("/v1/metrics", otlp, methods=["POST"]),
            Route("/-/ready", ready, methods=["GET"]),
            Route("/-/stats", stats, methods=["GET"]),
        ]
    )


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket; a clear one-line error when the address cannot be had."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        raise MetricmillError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings, *, host: str, port: int, on_ready: Callable[[str], None]) -> None:
    """Run the receiver until SIGINT/SIGTERM (uvicorn; requests in flight are finished)."""
    import uvicorn

    receiver = Receiver(settings, load_token(settings))
    receiver.prepare()
    sock = listen(host, port)
    config = uvicorn.Config(
        build_app(receiver),
        limit_concurrency=settings.receive_max_connections,
        access_log=False,  # query strings may carry credentials (Influx 1.x `p=`)
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=10,
    )
    bound_host, bound_port = sock.getsockname()[:2]
    on_ready(f"http://{bound_host}:{bound_port}")
    uvicorn.Server(config).run(sockets=[sock])

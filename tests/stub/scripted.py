"""A scripted provider: a bare WebSocket client that speaks the protocol.

It sends ``hello``, heartbeats on a timer, and answers ``inference_request``
with chunk(s) and an end frame. Knobs let a test hold requests, fail them,
or stop heartbeating; every received message is recorded and awaitable.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from provider.coordinator.messages import (
    CancelRequest,
    Hello,
    HelloAck,
    InferenceRequest,
    InferenceResponseChunk,
    InferenceResponseEnd,
    Invalid,
    MetricsSnapshot,
    StateUpdate,
    decode_coordinator_frame,
    encode_text,
    message_type,
)
from provider.openai.response import (
    SSE_DONE,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChoiceMessage,
    ChunkChoice,
    Delta,
    Usage,
    sse_event,
)

WARMUP_TEXT = "Reply with ok."


def make_hello(provider_id: str = "p1", **overrides: Any) -> Hello:
    fields: dict[str, Any] = {
        "provider_id": provider_id,
        "hostname": "test-host",
        "model_id": "test-model",
        "model_params_b": 0.5,
        "ram_gb": 16,
        "max_context_tokens": 4096,
        "max_concurrency": 4,
        "throughput_tps_estimate": 50.0,
        "binary_version": "0.1.0",
        "attestation": None,
    }
    fields.update(overrides)
    return Hello(**fields)


def is_warmup(request: InferenceRequest) -> bool:
    body = msgspec.json.decode(request.body)
    return body.get("max_tokens") == 2 and body["messages"][-1]["content"] == WARMUP_TEXT


def small_rcvbuf_socket(url_port: int, size: int = 4096, host: str = "127.0.0.1") -> socket.socket:
    """A connected client socket with a small receive buffer (set before connect)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    sock.connect((host, url_port))
    sock.setblocking(False)
    return sock


class ScriptedProvider:
    """Scripted provider client.

    Args:
        url: The stub's ``ws_url``.
        provider_id: Sent in ``hello``.
        token: Bearer token (``None``: no Authorization header).
        heartbeat_s: Heartbeat period; ``None`` sends none.
        answer_warmup: Answer the stub's warm-up request (else hold it until
            :meth:`release`).
        hold: Hold buyer requests until :meth:`release` or a cancel.
        error_status: Answer buyer requests with this end status, no chunks.
        warmup_tokens: ``completion_tokens`` reported for warm-ups.
        answer_cancels: Answer ``cancel_request`` with a cancelled end frame
            (else record it and keep holding).
    """

    def __init__(
        self,
        url: str,
        provider_id: str = "p1",
        *,
        token: str | None = "tok",
        heartbeat_s: float | None = 0.25,
        answer_warmup: bool = True,
        hold: bool = False,
        error_status: str | None = None,
        warmup_tokens: int = 2,
        answer_cancels: bool = True,
        hello: Hello | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        self.url = url
        self.provider_id = provider_id
        self.token = token
        self.heartbeat_s = heartbeat_s
        self.answer_warmup = answer_warmup
        self.hold = hold
        self.error_status = error_status
        self.warmup_tokens = warmup_tokens
        self.answer_cancels = answer_cancels
        self.hello = hello or make_hello(provider_id)
        self.sock = sock
        self.ws: ClientConnection | None = None
        self.hello_ack: HelloAck | None = None
        self.received: list[tuple[float, Any]] = []
        self.requests: dict[str, InferenceRequest] = {}
        self.cancels: list[CancelRequest] = []
        self.closed = asyncio.Event()
        self.status: str = "ready"
        self._released: dict[str, asyncio.Event] = {}
        self._cancelled: dict[str, asyncio.Event] = {}
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------

    async def connect(self, *, send_hello: bool = True) -> ClientConnection:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token is not None else {}
        self.ws = await connect(
            self.url,
            additional_headers=headers,
            ping_interval=None,
            max_size=None,
            open_timeout=5,
            close_timeout=1,
            proxy=None,
            **({"sock": self.sock} if self.sock is not None else {}),
        )
        self._spawn(self._receive())
        if send_hello:
            await self.ws.send(encode_text(self.hello))
        return self.ws

    async def start(self) -> HelloAck:
        """Connect, send hello, await hello_ack, start heartbeating."""
        await self.connect()
        ack = await self.wait_message("hello_ack")
        assert isinstance(ack, HelloAck)
        self.hello_ack = ack
        if self.heartbeat_s is not None:
            self._spawn(self._heartbeats())
        return ack

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 1)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def send(self, message: msgspec.Struct | dict[str, Any]) -> None:
        """Send a message: a provider Struct, or a dict encoded as is."""
        assert self.ws is not None
        if isinstance(message, dict):
            await self.ws.send(msgspec.json.encode(message).decode())
        else:
            await self.ws.send(encode_text(message))

    def heartbeat(self, **overrides: Any) -> dict[str, Any]:
        """A heartbeat as the real coordinator accepts it (no ``null`` optionals:
        Go drops a heartbeat whose ``loading`` is ``null``)."""
        h = self.hello
        return {
            "type": "heartbeat",
            "status": self.status,
            "model_id": h.model_id,
            "model_params_b": h.model_params_b,
            "ram_gb": h.ram_gb,
            "max_context_tokens": h.max_context_tokens,
            "max_concurrency": h.max_concurrency,
            "slots_free": h.max_concurrency,
            "slots_total": h.max_concurrency,
            "throughput_tps_estimate": h.throughput_tps_estimate,
            "requests_served_since_last": 0,
            "avg_latency_ms_since_last": 0.0,
            "throughput_tps_since_last": 0.0,
            **overrides,
        }

    def state_update(self, state: str, reason: str = "test") -> StateUpdate:
        slots = self.hello.max_concurrency
        return StateUpdate(
            state=state,  # type: ignore[arg-type]
            reason=reason,
            since="2026-01-01T00:00:00Z",
            metrics_snapshot=MetricsSnapshot(slots_free=slots, slots_total=slots),
        )

    async def _heartbeats(self) -> None:
        assert self.heartbeat_s is not None
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.send(self.heartbeat())
            except ConnectionClosed:
                return

    # ------------------------------------------------------------------

    async def _receive(self) -> None:
        assert self.ws is not None
        try:
            async for data in self.ws:
                msg = decode_coordinator_frame(data)
                self.received.append((time.monotonic(), msg))
                if isinstance(msg, InferenceRequest):
                    self.requests[msg.request_id] = msg
                    self._released[msg.request_id] = asyncio.Event()
                    self._cancelled[msg.request_id] = asyncio.Event()
                    self._spawn(self._answer(msg))
                elif isinstance(msg, CancelRequest):
                    self.cancels.append(msg)
                    event = self._cancelled.get(msg.request_id)
                    if event is not None and self.answer_cancels:
                        event.set()
                self._notify()
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def messages(self, type_: str) -> list[Any]:
        return [
            m for _, m in self.received if not isinstance(m, Invalid) and message_type(m) == type_
        ]

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                result = predicate()
                if result:
                    return result
                await self._changed.wait()

    async def wait_message(
        self, type_: str, where: Callable[[Any], bool] | None = None, timeout: float = 5.0
    ) -> Any:
        def check() -> Any:
            for m in self.messages(type_):
                if where is None or where(m):
                    return m
            return None

        return await self.wait_for(check, timeout)

    def buyer_requests(self) -> list[InferenceRequest]:
        return [r for r in self.requests.values() if not is_warmup(r)]

    async def wait_buyer_request(self, timeout: float = 5.0) -> InferenceRequest:
        return await self.wait_message("inference_request", lambda r: not is_warmup(r), timeout)

    def release(self, request_id: str | None = None) -> None:
        """Let held requests (one, or all) answer."""
        for rid, event in self._released.items():
            if request_id is None or rid == request_id:
                event.set()

    # ------------------------------------------------------------------

    async def _answer(self, request: InferenceRequest) -> None:
        rid = request.request_id
        warmup = is_warmup(request)
        if (warmup and not self.answer_warmup) or (not warmup and self.hold):
            released = asyncio.create_task(self._released[rid].wait())
            cancelled = asyncio.create_task(self._cancelled[rid].wait())
            await asyncio.wait({released, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            released.cancel()
            cancelled.cancel()
        try:
            if self._cancelled[rid].is_set():
                await self.send(self.end(rid, "cancelled", 0, completion_tokens=0))
            elif warmup:
                await self.send(self.chunk(rid, 0, self.completion_json("ok")))
                await self.send(self.end(rid, "complete", 1, completion_tokens=self.warmup_tokens))
            elif self.error_status is not None:
                await self.send(self.end(rid, self.error_status, 0, error="scripted failure"))
            elif request.stream:
                first, rest = self.stream_data()
                await self.send(self.chunk(rid, 0, first))
                await self.send(self.chunk(rid, 1, rest))
                await self.send(self.end(rid, "complete", 2))
            else:
                await self.send(self.chunk(rid, 0, self.completion_json("Hello world")))
                await self.send(self.end(rid, "complete", 1))
        except ConnectionClosed:
            pass

    @staticmethod
    def chunk(rid: str, seq: int, data: str) -> InferenceResponseChunk:
        return InferenceResponseChunk(request_id=rid, seq=seq, data=data)

    @staticmethod
    def end(
        rid: str,
        status: str,
        chunks_sent: int,
        *,
        completion_tokens: int = 2,
        error: str | None = None,
    ) -> InferenceResponseEnd:
        return InferenceResponseEnd(
            request_id=rid,
            status=status,  # type: ignore[arg-type]
            chunks_sent=chunks_sent,
            usage=Usage(
                prompt_tokens=5,
                completion_tokens=completion_tokens,
                total_tokens=5 + completion_tokens,
            ),
            error=error,
        )

    @staticmethod
    def completion_json(text: str) -> str:
        completion = ChatCompletion(
            id="chatcmpl-test",
            created=1700000000,
            model="test-model",
            choices=[Choice(message=ChoiceMessage(content=text), finish_reason="stop")],
            usage=Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7),
        )
        return msgspec.json.encode(completion).decode()

    @staticmethod
    def stream_data() -> tuple[str, str]:
        def chunk(delta: Delta, finish: Any = None, usage: Usage | None = None) -> str:
            return sse_event(
                ChatCompletionChunk(
                    id="chatcmpl-test",
                    created=1700000000,
                    model="test-model",
                    choices=[] if usage else [ChunkChoice(delta=delta, finish_reason=finish)],
                    usage=usage,
                )
            )

        first = chunk(Delta(role="assistant", content="Hello"))
        rest = (
            chunk(Delta(content=" world"), "stop")
            + chunk(Delta(), usage=Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7))
            + SSE_DONE
        )
        return first, rest

"""A fast DashScope-shaped upstream for the benchmark: raw asyncio HTTP/1.1, canned answers.

Why not the simulator: it validates every request, keeps task state and draws
a PNG, which costs more CPU per request than the gateway itself. On a 2-core
machine the upstream shares a core with the load generator, so it must cost a
few microseconds per request or it, not the gateway, becomes what is measured.
This server parses only the request line and the headers it acts on, and
answers with bytes built once.

    python -m bench.upstream --port N [--image-bytes B]

Routes (any method):
    /api/v1/services/...  DashScope sync answer (qwen-image shape, image_count 1);
                          its image URL points at /img/<image-bytes>.png here
        X-Bench-Hold: S   answer after S seconds (the long-generation case)
        X-Bench-Pad: N    answer with a valid JSON body of about N bytes
        X-Bench-Image: N  its image is a new one each time: /img/<counter>/<N>.png
                          (image storage keeps each image once, by URL)
    /api/v1/tasks/ID      a SUCCEEDED task (image_count 1) that names ID (an id of
                          letters, digits, `-` and `_`; any other id: `bench-task`)
    /img/N.png            N bytes starting with the PNG signature (also /img/TAG/N.png)
    /_bench/held          {"peak": N}: the most requests held (X-Bench-Hold) at once
                          since the last call (which starts a new count)
    anything else         404 in DashScope's error shape
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import signal
from typing import cast

_REQUEST_ID = b"7a3f1c2e-5b6d-4e8f-9a0b-1c2d3e4f5a6b"
_TASK_ID = re.compile(rb"[A-Za-z0-9_-]{1,128}")
_TASK_MARK = "@@TASK_ID@@"


def _http(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 "
        + status.encode()
        + b"\r\nContent-Type: "
        + ctype
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\nx-request-id: "
        + _REQUEST_ID
        + b"\r\n\r\n"
        + body
    )


def sync_answer(image_url: str, pad: int = 0) -> bytes:
    """The DashScope E1 sync success body; `pad` bytes of filler in `output.bench_pad`."""
    output: dict[str, object] = {
        "choices": [
            {
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": [{"image": image_url}]},
            }
        ]
    }
    if pad:
        output["bench_pad"] = "x" * pad
    return json.dumps(
        {
            "output": output,
            "usage": {"width": 1328, "height": 1328, "image_count": 1},
            "request_id": _REQUEST_ID.decode(),
        }
    ).encode()


class Answers:
    """Every response this upstream sends, built once per shape."""

    def __init__(self, port: int, image_bytes: int) -> None:
        self.image_url = f"http://127.0.0.1:{port}/img/{image_bytes}.png"
        self.sync = _http("200 OK", sync_answer(self.image_url))
        task = {
            "request_id": _REQUEST_ID.decode(),
            "output": {
                "task_id": _TASK_MARK,
                "task_status": "SUCCEEDED",
                "results": [{"url": self.image_url}],
            },
            "usage": {"image_count": 1},
        }
        # The task answer names the polled id: its body is built per request from
        # two halves (the reconciler polls thousands of distinct ids).
        head, tail = json.dumps(task).encode().split(_TASK_MARK.encode())
        self._task_body = (head, tail)
        self.not_found = _http("404 Not Found", b'{"code":"NotFound","message":"no route"}')
        self.bad_request = _http("400 Bad Request", b'{"code":"BadRequest","message":"bad"}')
        self._padded: dict[int, bytes] = {}
        self._images: dict[int, bytes] = {}
        self._noise = os.urandom(1024 * 1024)
        self._fresh = 0
        self.held = 0  # requests waiting out their X-Bench-Hold now
        self.peak_held = 0

    def task_answer(self, task_id: bytes) -> bytes:
        if _TASK_ID.fullmatch(task_id) is None:
            task_id = b"bench-task"
        head, tail = self._task_body
        return _http("200 OK", head + task_id + tail)

    def padded(self, size: int) -> bytes:
        out = self._padded.get(size)
        if out is None:
            out = self._padded[size] = _http("200 OK", sync_answer(self.image_url, size))
        return out

    def image(self, size: int) -> bytes:
        out = self._images.get(size)
        if out is None:
            body = b"\x89PNG\r\n\x1a\n" + (self._noise * (size // len(self._noise) + 1))
            out = self._images[size] = _http("200 OK", body[:size], b"image/png")
        return out

    def fresh(self, size: int) -> bytes:
        """A sync answer whose image URL has never been handed out before."""
        self._fresh += 1
        url = self.image_url.rsplit("/", 1)[0] + f"/{self._fresh}/{size}.png"
        return _http("200 OK", sync_answer(url))

    def answer(self, path: bytes, pad: int, image: int = 0) -> bytes:
        if path.startswith(b"/api/v1/services/"):
            if image:
                return self.fresh(image)
            return self.padded(pad) if pad else self.sync
        if path.startswith(b"/api/v1/tasks/"):
            return self.task_answer(path[14:].split(b"?", 1)[0])
        if path.startswith(b"/img/") and path.endswith(b".png"):
            try:
                size = int(path[5:-4].rsplit(b"/", 1)[-1])
            except ValueError:
                return self.not_found
            return self.image(min(max(size, 8), 256 * 1024 * 1024))
        return self.not_found


class _Conn(asyncio.Protocol):
    __slots__ = ("_answers", "_buf", "_loop", "_transport")

    def __init__(self, answers: Answers) -> None:
        self._answers = answers
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ")
            path = parts[1] if len(parts) > 1 else b"/"
            length = 0
            hold = 0.0
            pad = 0
            image = 0
            try:
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"x-bench-hold":
                        hold = float(value)
                    elif name == b"x-bench-pad":
                        pad = int(value)
                    elif name == b"x-bench-image":
                        image = int(value)
                    elif name == b"transfer-encoding":
                        raise ValueError("chunked request bodies are not supported")
            except ValueError:
                self._send(self._answers.bad_request)
                if self._transport is not None:
                    self._transport.close()
                return
            if len(buf) < end + 4 + length:
                return
            del buf[: end + 4 + length]
            answers = self._answers
            if path == b"/_bench/held":
                peak, answers.peak_held = answers.peak_held, answers.held
                self._send(_http("200 OK", json.dumps({"peak": peak}).encode()))
                continue
            answer = answers.answer(path, pad, image)
            if hold > 0:
                answers.held += 1
                answers.peak_held = max(answers.peak_held, answers.held)
                self._loop.call_later(hold, self._answer_held, answer)
            else:
                self._send(answer)

    def _answer_held(self, data: bytes) -> None:
        self._answers.held -= 1
        self._send(data)

    def _send(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)


async def serve(host: str, port: int, image_bytes: int) -> None:
    loop = asyncio.get_running_loop()
    answers = Answers(port, image_bytes)
    server = await loop.create_server(lambda: _Conn(answers), host, port, backlog=8192)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"bench upstream at http://{host}:{port}", flush=True)
    async with server:
        await stop.wait()


def raise_fd_limit() -> None:
    """Thousands of held connections need more descriptors than the usual soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--image-bytes", type=int, default=3 * 1024 * 1024)
    args = parser.parse_args()
    raise_fd_limit()
    install_uvloop()
    asyncio.run(serve(args.host, args.port, args.image_bytes))


if __name__ == "__main__":
    main()

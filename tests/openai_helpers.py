"""Helpers for the OpenAI-API and /aliyun/v1 tests: SDK clients, simulator records, plain HTTP."""

from __future__ import annotations

import base64
import struct
import zlib
from typing import Any

import aiohttp
import openai
import requests

from tests.conftest import KEY_A, Gateway
from tests.support import Live, LoopThread


def client(gw: Gateway, key: str = KEY_A) -> openai.OpenAI:
    """The official OpenAI SDK pointed at the gateway; no retries, so each call is one request."""
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=30)


def sim_requests(sim: Live) -> list[dict[str, Any]]:
    return list(requests.get(sim.url + "/_sim/requests", timeout=5).json()["requests"])


def sim_generations(sim: Live) -> list[dict[str, Any]]:
    """What reached the simulator's generation endpoints, oldest first."""
    return [r for r in sim_requests(sim) if "/services/" in r["path"]]


def header(record: dict[str, Any], name: str) -> str | None:
    return {k.lower(): v for k, v in record["headers"].items()}.get(name.lower())


def content_of(record: dict[str, Any]) -> list[dict[str, Any]]:
    return list(record["body"]["input"]["messages"][0]["content"])


def png(width: int = 300, height: int = 300, shade: int = 90) -> bytes:
    """A small valid RGB PNG (DashScope edit models take 240+ px sides)."""
    raw = b"".join(b"\x00" + bytes([shade, 120, 200]) * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def fetch(url: str) -> bytes:
    resp = requests.get(url, timeout=5)
    assert resp.status_code == 200, resp.text
    return resp.content


def http(
    lt: LoopThread, method: str, url: str, key: str | None = KEY_A, json: Any = None
) -> tuple[int, Any]:
    """One plain HTTP request with aiohttp's client (run on the loop thread): status, JSON."""

    async def go() -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, url, json=json, headers=headers) as resp,
        ):
            return resp.status, await resp.json(content_type=None)

    return lt.run(go())

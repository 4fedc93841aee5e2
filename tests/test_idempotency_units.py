"""The pure parts of `Idempotency-Key` (the header rule, content digests, the kept answer's
encoding, the config) and the local store's one-transaction claim on a real SQLite file."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.config import ConfigError, parse_config
from proxy.core.idempotency_key import (
    MultipartDigest,
    check_key,
    json_fingerprint,
    scope_of,
)
from proxy.errors import GatewayError
from proxy.state.idempotency import KeptAnswer, SqliteIdempotency
from tests.conftest import gateway_yaml


@pytest.mark.parametrize("value", ["a", "x" * 255, "order-42 retry", "~!@#$%^&*()"])
def test_valid_keys(value: str) -> None:
    assert check_key([value]) == value


@pytest.mark.parametrize(
    "values", [[""], ["x" * 256], ["caf\u00e9"], ["tab\tin"], ["new\nline"], ["a", "b"]]
)
def test_invalid_keys_are_400(values: list[str]) -> None:
    with pytest.raises(GatewayError) as err:
        check_key(values)
    assert err.value.status == 400 and err.value.code == "InvalidParameter"


def test_absent_key() -> None:
    assert check_key([]) is None


def test_json_digest_ignores_key_order_not_values_route_or_headers() -> None:
    a = json_fingerprint("r", {}, {"a": 1, "b": {"c": [1, 2], "d": "é"}})
    assert a == json_fingerprint("r", {}, {"b": {"d": "é", "c": [1, 2]}, "a": 1})
    assert a != json_fingerprint("r", {}, {"a": 1, "b": {"c": [2, 1], "d": "é"}})
    assert a != json_fingerprint("other", {}, {"a": 1, "b": {"c": [1, 2], "d": "é"}})
    sse = {"X-DashScope-SSE": "enable"}
    assert a != json_fingerprint("r", sse, {"a": 1, "b": {"c": [1, 2], "d": "é"}})
    # Headers outside the list (the SDK's session id, say) do not matter.
    assert a == json_fingerprint("r", {"X-Other": "1"}, {"b": {"d": "é", "c": [1, 2]}, "a": 1})


def test_multipart_digest_is_parts_in_order_length_prefixed() -> None:
    def digest(*parts: tuple[str, str | None, bytes]) -> str:
        d = MultipartDigest("openai.edits", {})
        for part in parts:
            d.part(*part)
        return d.hexdigest()

    one = digest(("prompt", None, b"ab"), ("image", "image/png", b"\x89PNG"))
    assert one == digest(("prompt", None, b"ab"), ("image", "image/png", b"\x89PNG"))
    assert one != digest(("image", "image/png", b"\x89PNG"), ("prompt", None, b"ab"))
    assert one != digest(("prompt", None, b"a"), ("image", "image/png", b"b\x89PNG"))


def test_scope_is_per_gateway_key_and_holds_no_client_text() -> None:
    assert scope_of("team-a", "k") != scope_of("team-b", "k")
    assert "k{" not in scope_of("team-a", "k{x}") and len(scope_of("a", "b")) == 64


def test_kept_answer_round_trip() -> None:
    answer = KeptAnswer(200, (("Content-Type", "text/event-stream"),), b"\x00data: {}\n\n\xff")
    assert KeptAnswer.decode(answer.encode()) == answer
    assert KeptAnswer.decode("not json") is None and KeptAnswer.decode(None) is None


def test_config_defaults_and_lease_check(tmp_path: Path) -> None:
    base = gateway_yaml("http://127.0.0.1:1", tmp_path / "s.db")
    config = parse_config(base, {})
    assert config.idempotency.ttl_seconds == 86400
    assert config.idempotency_lease == 600 + 600 + 60  # timeouts.total + sync wait + 1 min
    custom = parse_config(base + "idempotency: {ttl_seconds: 60, lease_seconds: 900}\n", {})
    assert custom.idempotency.ttl_seconds == 60 and custom.idempotency_lease == 900
    with pytest.raises(ConfigError) as err:
        parse_config(base + "idempotency: {lease_seconds: 30, max_answer_bytes: 1, typo: 1}\n", {})
    text = "\n".join(err.value.problems)
    assert "idempotency.lease_seconds" in text and "idempotency.max_answer_bytes" in text
    assert "idempotency.typo" in text


def test_local_claim_is_one_transaction_across_processes_sharing_the_file(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        path = str(tmp_path / "state.db")
        stores = [SqliteIdempotency(path) for _ in range(4)]  # as four workers would
        for store in stores:
            await store.open()
        try:
            for round_ in range(20):
                scope = f"scope-{round_}"
                got = await asyncio.gather(
                    *(s.claim(scope, "fp", f"t{i}", 60, 60) for i, s in enumerate(stores))
                )
                assert sum(entry is None for entry in got) == 1
            winner = stores[0]
            assert await winner.claim("x", "fp", "me", 60, 60) is None
            assert (
                await stores[1].keep("x", "someone-else", KeptAnswer(200, (), b"no"), 60) is False
            )
            assert await winner.keep("x", "me", KeptAnswer(201, (), b"yes"), 60) is True
            entry = await stores[2].claim("x", "fp", "late", 60, 60)
            assert entry is not None and entry.answer == KeptAnswer(201, (), b"yes")
            # A released claim is free again; a kept answer is never released.
            assert await winner.claim("y", "fp", "me", 60, 60) is None
            await winner.release("y", "me")
            assert await stores[3].claim("y", "fp2", "next", 60, 60) is None
            await winner.release("x", "me")
            assert (await stores[1].claim("x", "fp", "again", 60, 60)) is not None
            # Expired entries are claimable again.
            assert await winner.claim("z", "fp", "me", 0.01, 0.01) is None
            await asyncio.sleep(0.05)
            assert await stores[1].claim("z", "fp", "new", 60, 60) is None
        finally:
            for store in stores:
                await store.close()

    asyncio.run(run())

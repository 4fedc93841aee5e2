"""A real S3-compatible server for the tests: moto's standalone server, started and stopped here.

moto's server (from `moto[server]`) speaks the S3 REST API over a socket on 127.0.0.1, so the
backend is tested through aiobotocore, aiohttp and HTTP exactly as against AWS or MinIO; no
client is mocked (moto's in-process `mock_aws` is not used anywhere). The server keeps its
objects in memory: a restart (`MotoServer.restart`) empties it, which is what an outage test
needs; the bucket is created again afterwards so the store works again.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from proxy.config.model import StorageConfig

BUCKET = "dashscope-images"
REGION = "us-east-1"
# moto accepts any key pair; these are only what the tests sign with (not secrets).
ACCESS_KEY_ID = "AKIATESTS3BACKEND0001"
SECRET_ACCESS_KEY = "test-s3-secret-key-0123456789abcdefghij"


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (nothing listens on it right now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """moto's S3 server as a subprocess on a fixed free port, restartable on the same port."""

    def __init__(self, logdir: Path) -> None:
        self.port = free_port()
        self.log = logdir / "moto-server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server, wait until it answers, and create the test bucket."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {self.log.read_text()[-2000:]}")
            try:
                requests.get(self.endpoint + "/moto-api/", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError("moto server did not start")
        self.create_bucket(BUCKET)

    def create_bucket(self, name: str) -> None:
        """Create a bucket with a real client (boto3, signed like any S3 call)."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()

    def client(self, service: str = "s3"):  # type: ignore[no-untyped-def]
        """A synchronous boto3 client for the server: the tests' own look into the bucket."""
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port (empty: moto keeps objects in memory)."""
        self.stop()
        self.start()

    def storage_config(self, prefix: str = "", **overrides: object) -> StorageConfig:
        """A `storage:` section for this server (`backend: s3`)."""
        fields: dict[str, object] = {
            "backend": "s3",
            "bucket": BUCKET,
            "endpoint_url": self.endpoint,
            "region": REGION,
            "access_key_id": ACCESS_KEY_ID,
            "secret_access_key": SECRET_ACCESS_KEY,
            "prefix": prefix,
            "signing_key": "test-image-link-key",
        }
        fields.update(overrides)
        return StorageConfig(**fields)  # type: ignore[arg-type]

    def storage_yaml(self, prefix: str = "") -> str:
        """The same section as gateway YAML (for a gateway process)."""
        return f"""
storage:
  backend: s3
  bucket: {BUCKET}
  endpoint_url: {self.endpoint}
  region: {REGION}
  access_key_id: {ACCESS_KEY_ID}
  secret_access_key: {SECRET_ACCESS_KEY}
  prefix: "{prefix}"
  signing_key: test-image-link-key
"""


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto's S3 server for one test module, with the bucket `BUCKET` created; stopped after.

    Tests that stop it (an outage) must start it again before they end (`restart`), so the
    next test of the module finds it up.
    """
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()

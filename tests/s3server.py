"""A real S3 API server for tests: moto's server mode in a subprocess on a loopback port.

IAM is enforced after the first :data:`SETUP_ACTIONS` calls, which create a user with an
S3 policy and its access key; every later request must be signed with that key, so wrong
credentials are refused as by AWS (``InvalidAccessKeyId``, ``SignatureDoesNotMatch``).

Example:

```python
with S3Server.start() as s3:
    s3.client().create_bucket(Bucket="models")
    env = s3.env()  # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, region
```
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.tools import PortTaken, launch_on_free_port, port_taken

SETUP_ACTIONS = 3
"""IAM calls moto lets through unauthenticated: create the user, its policy, its key."""
REGION = "us-east-1"


@dataclass
class S3Server:
    """A running moto server and the access key of its one IAM user."""

    proc: subprocess.Popen[bytes]
    port: int
    key_id: str = ""
    secret: str = ""
    log: Path = field(default_factory=Path)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    @contextlib.contextmanager
    def start(cls, log_dir: Path, port: int | None = None) -> Iterator[S3Server]:
        """Starts ``python -m moto.server`` and stops it by its PID on exit, whatever happened."""
        server = cls.launch(log_dir, port)
        try:
            yield server
        finally:
            server.stop()

    @classmethod
    def launch(cls, log_dir: Path, port: int | None = None) -> S3Server:
        """Starts the server, waits until it answers, and creates the IAM user (stopped on failure).

        moto cannot report a port it picked itself: without ``port`` it gets one that was free
        a moment ago, and another one when a different process took it before moto bound it.
        """
        if port is None:
            return launch_on_free_port(lambda free: cls.launch(log_dir, free))
        log = log_dir / f"moto-{port}.log"
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_ACTIONS)}
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        server = cls(proc, port, log=log)
        try:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    if port_taken(log.read_text(errors="replace")):
                        raise PortTaken(f"port {port}")
                    raise RuntimeError(f"moto server exited with {proc.returncode}:\n{log.read_text()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server not answering:\n{log.read_text()}")
                with contextlib.suppress(httpx.HTTPError):
                    answer = httpx.get(f"{server.endpoint}/moto-api/", timeout=1)
                    # Our moto, not another server on a port it took first (ours would exit).
                    if answer.status_code == 200 and proc.poll() is None:
                        break
                time.sleep(0.1)
            server._create_user()
        except BaseException:
            server.stop()
            raise
        return server

    def _create_user(self) -> None:
        iam = self.client("iam", key_id="setup", secret="setup")
        iam.create_user(UserName="modelloop")
        iam.put_user_policy(
            UserName="modelloop",
            PolicyName="s3",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
                }
            ),
        )
        key = iam.create_access_key(UserName="modelloop")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]

    def client(self, service: str = "s3", *, key_id: str | None = None, secret: str | None = None) -> Any:
        """A boto3 client of this server (the IAM user's key unless another is given)."""
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=key_id or self.key_id,
            aws_secret_access_key=secret or self.secret,
        )

    def env(self, **overrides: str) -> dict[str, str]:
        """The variables a process needs to reach this server with the IAM user's key."""
        values = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        values.update(overrides)
        return values

    def stop(self) -> None:
        """Stops the server by its PID (SIGTERM, then SIGKILL)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def upload_tree(self, local: Path, bucket: str, prefix: str, *, skip: tuple[str, ...] = ()) -> None:
        """Uploads every file under ``local`` to ``bucket/prefix/...`` (``skip``: relative paths)."""
        s3 = self.client()
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = path.relative_to(local).as_posix()
            if rel not in skip:
                s3.upload_file(str(path), bucket, f"{prefix}/{rel}")

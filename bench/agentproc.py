"""The real ``strata-agent`` as a child process, and the calls the figures make through it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from typing import Any

from bench import context, tools
from rpc import transport
from tests import process

FORMAT = "localfs-1.0"
DEFAULT = "default"
# How long "broken, with last_error" must last to count as a failure.
BROKEN_GRACE = 1.0
MIN_POLL = 0.001
MAX_POLL = 0.05


class Agent:
    """``python -m rpc.main --dev DIR``: socket DIR/agent.sock, repository "default" connected."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.socket = os.path.join(directory, "agent.sock")
        self.log = os.path.join(directory, "agent.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: transport.Client | None = None
        # disconnectStorageRepository refused as busy right after an image turned optimized.
        self.busy_disconnects = 0
        # getImageStatus said broken with an error, and a moment later it was not.
        self.transient_broken = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        os.makedirs(self.dir, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": context.ROOT}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rpc.main", "--dev", self.dir],
                stdout=log, stderr=log, env=env, cwd=context.ROOT,
            )
        proc = self.proc
        if not transport.wait_for_socket(self.socket, timeout, lambda: proc.poll() is None):
            raise context.BenchError(
                f"strata-agent did not listen within {timeout} s (exit {proc.poll()}): "
                f"{self.tail()}")

    def stop(self) -> None:
        """SIGTERM (calls finish, operations stay resumable), SIGKILL if it hangs."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is not None:
            process.terminate(self.proc, 60)

    def stop_client(self) -> None:
        """Close the main client (before the agent is killed: its connection dies with it)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise context.BenchError("the agent is not running")
        return self.proc.pid

    def tail(self, n: int = 3000) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-n:]
        except FileNotFoundError:
            return ""

    def log_count(self, needle: str) -> int:
        with open(self.log, errors="replace") as f:
            return sum(1 for line in f if needle in line)

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM of the daemon, in bytes."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    # -- calls -----------------------------------------------------------------------------------

    def client(self) -> transport.Client:
        """A new keep-alive client (one per thread)."""
        return transport.Client(socket_path=self.socket, timeout=600.0)

    @property
    def main(self) -> transport.Client:
        """The main thread's keep-alive client."""
        if self._client is None:
            self._client = self.client()
        return self._client

    def call(self, method: str, *args: Any, **params: Any) -> Any:
        return self.main.call(method, *args, **params)

    def wait(self, repo: str, image_id: str, client: transport.Client | None = None,
             interval: float | None = None, timeout: float = 900.0) -> float:
        """Poll getImageStatus until the image is optimized and nothing runs on it; return
        perf_counter() at that moment. A failed operation is a BenchError.

        By default the poll interval is 1 ms, growing to 1% of the time waited so far (at most
        50 ms): a create is seen within a millisecond, and a copy of seconds is not slowed by
        a thousand status calls a second competing with it for two cores (seen within 1%)."""
        c = client or self.main
        start = time.perf_counter()
        deadline = time.monotonic() + timeout
        broken_since: float | None = None
        while True:
            s = c.call("getImageStatus", repo, image_id)
            if s["status"] == "optimized" and not s["running"]:
                if broken_since is not None:
                    self.transient_broken += 1
                return time.perf_counter()
            if s["status"] == "broken" and s["last_error"]:
                # A failure, unless it is gone on the next looks (see transient_broken).
                now = time.monotonic()
                broken_since = broken_since or now
                if now - broken_since > BROKEN_GRACE:
                    raise context.BenchError(f"image {image_id} in {repo!r} failed: {s}")
            elif broken_since is not None:
                self.transient_broken += 1
                broken_since = None
            if time.monotonic() > deadline:
                raise context.BenchError(f"image {image_id} did not become optimized: {s}")
            time.sleep(interval if interval is not None
                       else min(MAX_POLL, max(MIN_POLL, (time.perf_counter() - start) / 100)))

    def timed(self, repo: str, method: str, *args: Any,
              client: transport.Client | None = None, interval: float | None = None,
              **params: Any) -> tuple[str, float, float]:
        """Call a method that makes an image; return its id, the time the call took to return
        and the time until the image was optimized (both from the call), polled as ``wait``
        does with that ``interval``."""
        c = client or self.main
        t0 = time.perf_counter()
        image_id: str = c.call(method, *args, **params)
        t1 = time.perf_counter()
        t2 = self.wait(repo, image_id, c, interval=interval)
        return image_id, t1 - t0, t2 - t0

    def settled(self, repo: str, method: str, *args: Any, **params: Any) -> str:
        image_id, _, _ = self.timed(repo, method, *args, **params)
        return image_id

    # -- repositories ----------------------------------------------------------------------------

    def add_repo(self, repo_id: str, path: str, client: transport.Client | None = None) -> None:
        c = client or self.main
        params = {"path": path}
        c.call("formatStorageRepository", repoFormat=FORMAT, connectionParameters=params)
        c.call("connectStorageRepository", repoId=repo_id, repoFormat=FORMAT,
               connectionParameters=params)

    def drop_repo(self, repo_id: str, path: str, client: transport.Client | None = None) -> None:
        """Disconnect a repository and delete it with its data."""
        c = client or self.main
        deadline = time.monotonic() + 30
        while True:
            try:
                c.call("disconnectStorageRepository", repoId=repo_id)
                break
            except transport.RemoteError as e:
                # Right after an image turns optimized, the agent may still count its
                # operation as running for a moment: counted, reported, retried.
                if e.name != "ImageBusy" or time.monotonic() > deadline:
                    raise
                self.busy_disconnects += 1
                time.sleep(0.01)
        shutil.rmtree(path, ignore_errors=True)

    # -- images ----------------------------------------------------------------------------------

    def top_path(self, repo: str, image_id: str) -> str:
        """The image's top volume (prepared, then torn down again)."""
        path: str = self.call("prepareImage", repositoryId=repo, imageId=image_id)["path"]
        self.call("teardownImage", repositoryId=repo, imageId=image_id)
        return path

    def write(self, repo: str, image_id: str, chunks: list[tuple[int, int, int]]) -> None:
        """Write into a disk as a consumer does: prepare, qemu-io, tear down."""
        path: str = self.call("prepareImage", repositoryId=repo, imageId=image_id)["path"]
        try:
            tools.write(path, chunks)
        finally:
            self.call("teardownImage", repositoryId=repo, imageId=image_id)

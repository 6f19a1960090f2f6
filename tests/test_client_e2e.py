"""strata-client as a user runs it: a subprocess talking to the real strata-agent daemon."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
ENV = {**os.environ, "PYTHONPATH": ROOT}


def _wait_listening(proc: subprocess.Popen[bytes], sock: str, log: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"strata-agent exited {proc.returncode}:\n{_tail(log)}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(sock)
            return
        except OSError:
            time.sleep(0.05)
        finally:
            s.close()
    proc.kill()
    proc.wait()
    raise AssertionError(f"strata-agent did not listen on {sock} in {timeout} s:\n{_tail(log)}")


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-4000:]


@pytest.fixture(scope="module")
def sock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real daemon in --dev mode (repoId ``default``); stopped with SIGTERM, exit 0."""
    dev = tmp_path_factory.mktemp("client-e2e") / "dev"
    dev.mkdir()
    path = str(dev / "agent.sock")
    log = str(dev.parent / "agent.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rpc.main", "--dev", str(dev)],
                                stdout=out, stderr=out, env=ENV)
    _wait_listening(proc, path, log, 20.0)
    yield path
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"strata-agent ignored SIGTERM:\n{_tail(log)}") from None
    assert rc == 0, _tail(log)


def cli(sock: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rpc.client", "-s", sock, *args],
                          input=stdin, capture_output=True, text=True, env=ENV, timeout=90)


def one_error_line(p: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("strata-client: ")
    return lines[0]


def create_disk(sock: str, size: str = "64M") -> str:
    p = cli(sock, "createVirtualDisk", "targetRepoId=default", f"size={size}", "--watch")
    assert p.returncode == 0, p.stderr
    assert UUID_RE.fullmatch(p.stdout.strip()), p.stdout
    return p.stdout.strip()


def image_ids(sock: str) -> list[str]:
    p = cli(sock, "--json", "listImages", "repositoryId=default")
    assert p.returncode == 0, p.stderr
    return [i["imageId"] for i in json.loads(p.stdout)]


def test_get_host_info(sock: str) -> None:
    p = cli(sock, "getHostInfo")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "hostID: 1" in lines
    assert "repositories: default" in lines
    assert p.stderr == ""


def test_create_watch_list_and_json(sock: str) -> None:
    p = cli(sock, "createVirtualDisk", "targetRepoId=default", "size=64M", "--watch")
    assert p.returncode == 0, p.stderr
    assert UUID_RE.fullmatch(p.stdout.strip()) and p.stdout.count("\n") == 1, p.stdout
    image = p.stdout.strip()
    # stderr is no TTY here: one progress line per change, the last one the final state.
    assert p.stderr.splitlines()[-1].startswith("[" + "#" * 30 + "] 100%  optimized")

    p = cli(sock, "listImages", "repositoryId=default")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["IMAGE", "ID", "KIND", "SIZE", "STATUS", "PREPARED", "PARENT",
                                "CREATED"]
    row = next(line for line in lines if line.startswith(image))
    assert row.split()[:7] == [image, "disk", "64", "MiB", "optimized", "no", "-"]
    day, clock = row.split()[7:]  # CREATED: the local date and time
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", day), row
    assert re.fullmatch(r"\d\d:\d\d:\d\d[+-]\d\d:\d\d", clock), row

    p = cli(sock, "--json", "listImages", "repositoryId=default")
    assert p.returncode == 0, p.stderr
    listed = {i["imageId"]: i for i in json.loads(p.stdout)}
    assert listed[image]["size"] == 64 << 20 and listed[image]["kind"] == "disk"

    p = cli(sock, "getImageStatus", "repositoryId=default", f"imageId={image}", "--json")
    assert json.loads(p.stdout)["status"] == "optimized"

    p = cli(sock, "getImageStatus", "repositoryId=default", f"imageId={image}", "--watch")
    assert p.returncode == 0, p.stderr
    assert "status: optimized" in p.stdout.splitlines()


def test_snapshot_watch_and_params_file(sock: str) -> None:
    disk = create_disk(sock)
    params = json.dumps({"targetRepoId": "nope", "baseVirtualDiskId": disk,
                         "userData": {"by": "file"}})
    p = cli(sock, "createSnapshot", "-f", "-", "targetRepoId=default", "--watch", stdin=params)
    assert p.returncode == 0, p.stderr
    snap = p.stdout.strip()
    assert UUID_RE.fullmatch(snap)
    p = cli(sock, "getImageInfo", "repositoryId=default", f"imageId={snap}")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "kind: snapshot" in lines and 'userData: {"by":"file"}' in lines


def test_list_repositories_and_check_tables(sock: str) -> None:
    p = cli(sock, "listStorageRepositories")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["REPO", "ID", "FORMAT", "CAPACITY", "FREE", "IMAGES"]
    assert lines[1].split()[:2] == ["default", "localfs-1.0"]
    p = cli(sock, "checkStorageRepository", "repositoryId=default")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0].split() == ["TYPE", "IMAGES", "DESCRIPTION"]


def test_null_result_prints_nothing(sock: str) -> None:
    disk = create_disk(sock)
    p = cli(sock, "setImageUserData", "repositoryId=default", f"imageId={disk}",
            'userData={"vm": "web1"}')
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")


def test_unknown_method_exits_2(sock: str) -> None:
    p = cli(sock, "createVirtualDisks", "targetRepoId=default")
    assert p.returncode == 2
    assert one_error_line(p) == (
        "strata-client: unknown method 'createVirtualDisks'; did you mean createVirtualDisk?")


def test_unknown_param_exits_2(sock: str) -> None:
    p = cli(sock, "listImages", "repoId=default")
    assert p.returncode == 2
    assert one_error_line(p) == (
        "strata-client: unknown param 'repoId' for listImages (valid: repositoryId, options)")


def test_domain_error_exits_1(sock: str) -> None:
    missing = str(uuid.uuid4())
    p = cli(sock, "getImageStatus", "repositoryId=default", f"imageId={missing}")
    assert p.returncode == 1
    line = one_error_line(p)
    assert line.startswith("strata-client: ImageNotFound (1200): ")
    assert missing in line
    assert p.stdout == ""


def test_bad_image_id_is_refused_by_the_agent(sock: str) -> None:
    p = cli(sock, "getImageStatus", "repositoryId=default", "imageId=../../etc/passwd")
    assert p.returncode == 1
    line = one_error_line(p)
    assert "(-32602)" in line and "'imageId'" in line


def test_bad_size_exits_2_and_changes_nothing(sock: str) -> None:
    before = image_ids(sock)
    p = cli(sock, "createVirtualDisk", "targetRepoId=default", "size=12Q")
    assert p.returncode == 2
    assert one_error_line(p) == (
        "strata-client: bad size for param 'size': "
        "'12Q' is not a size (bytes, or a number with K, M, G, T or P)")
    assert image_ids(sock) == before


@pytest.mark.parametrize("size", ["abc", "-1", "1.5.5G", "10Q", "0x10", '{"a": 1}', "0",
                                  "1000", "1.5", "65T", "true", "[1]"])
def test_every_bad_size_exits_2_and_changes_nothing(sock: str, size: str) -> None:
    before = image_ids(sock)
    p = cli(sock, "createVirtualDisk", "targetRepoId=default", f"size={size}")
    assert p.returncode == 2, p
    assert one_error_line(p).startswith("strata-client: bad size for param 'size': ")
    assert image_ids(sock) == before


@pytest.mark.parametrize("size", ['{"a": 1}', "-1", "true", "1000", '"12Q"', "null", "1.5"])
def test_every_bad_size_in_a_params_file_exits_2(sock: str, size: str) -> None:
    before = image_ids(sock)
    p = cli(sock, "createVirtualDisk", "-f", "-",
            stdin=f'{{"targetRepoId": "default", "size": {size}}}')
    assert p.returncode == 2, p
    assert one_error_line(p).startswith("strata-client: bad size for param 'size': ")
    assert image_ids(sock) == before


def test_a_repeated_param_exits_2_naming_it(sock: str) -> None:
    before = image_ids(sock)
    p = cli(sock, "createVirtualDisk", "targetRepoId=default", "size=1G", "size=2G")
    assert p.returncode == 2, p
    assert one_error_line(p) == ("strata-client: param 'size' is given twice (size=1G and "
                                 "size=2G): give it once")
    assert image_ids(sock) == before
    p = cli(sock, "fixStorageRepository", "repositoryId=default", "repositoryId=r2", "--all")
    assert p.returncode == 2 and "param 'repositoryId' is given twice" in one_error_line(p)


def test_human_output_and_raw_json(sock: str) -> None:
    disk = create_disk(sock, "1536M")
    p = cli(sock, "getImageInfo", "repositoryId=default", f"imageId={disk}")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "size: 1.5 GiB (1610612736 bytes)" in lines
    [created] = [line for line in lines if line.startswith("created: ")]
    assert re.fullmatch(r"created: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d\d:\d\d", created)
    p = cli(sock, "--json", "getImageInfo", "repositoryId=default", f"imageId={disk}")
    raw = json.loads(p.stdout)
    assert raw["size"] == 1610612736 and isinstance(raw["created"], float)
    assert abs(raw["created"] - time.time()) < 600


def test_watched_operation_failure_exits_4(sock: str) -> None:
    p = cli(sock, "createVirtualDisk", "targetRepoId=default", "size=1G",
            'options={"AutoFix": false}', "--watch")
    assert p.returncode == 2 and "AutoFix=false" in one_error_line(p)

    p = cli(sock, "createVirtualDisk", "targetRepoId=default", "size=1G",
            'options={"AutoFix": false}')
    assert p.returncode == 0, p.stderr
    image = p.stdout.strip()
    p = cli(sock, "stopOperation", "repositoryId=default", f"imageId={image}")
    assert p.returncode == 0, p.stderr
    p = cli(sock, "getImageStatus", "repositoryId=default", f"imageId={image}", "--watch")
    assert p.returncode == 4
    assert p.stderr.splitlines()[-1] == (
        f"strata-client: image {image} failed: stopped by client")
    p = cli(sock, "removeImage", "repositoryId=default", f"imageId={image}")
    assert p.returncode == 0, p.stderr


def test_unreachable_socket_exits_3(tmp_path: Any) -> None:
    missing = str(tmp_path / "nobody.sock")
    p = cli(missing, "getHostInfo")
    assert p.returncode == 3
    assert one_error_line(p) == (
        f"strata-client: cannot reach the agent at {missing}: No such file or directory")


def test_method_help_from_the_agent(sock: str) -> None:
    p = cli(sock, "createVirtualDisk", "-h")
    assert p.returncode == 0, p.stderr
    names = [line.split()[0] for line in p.stdout.splitlines() if line.startswith("  ")]
    for name in ("targetRepoId", "size", "baseSnapshotId", "userData", "options"):
        assert name in names
    assert "ImageNotFound (1200)" in p.stdout

    p = cli(sock, "-h")
    assert p.returncode == 0, p.stderr
    assert "exit codes:" in p.stdout and "  getImageStatus " in p.stdout


def test_list_images_pages_and_filters(sock: str, tmp_path: Any) -> None:
    params = json.dumps({"path": str(tmp_path / "pages")})
    for method, extra in (("formatStorageRepository", ["repoFormat=localfs-1.0"]),
                          ("connectStorageRepository", ["repoId=pages", "repoFormat=localfs-1.0"])):
        p = cli(sock, method, *extra, f"connectionParameters={params}")
        assert p.returncode == 0, p.stderr
    made = []
    for i in range(5):
        p = cli(sock, "createVirtualDisk", "targetRepoId=pages", "size=64M",
                f'userData={{"vm": "{"web" if i % 2 else "db"}", "n": {i}}}', "--watch")
        assert p.returncode == 0, p.stderr
        made.append(p.stdout.strip())

    # One page at a time, as a person would: stderr names the command of the next page.
    seen: list[str] = []
    args = ["listImages", "repositoryId=pages", "--limit", "2"]
    for n, expected in enumerate((made[:2], made[2:4], made[4:])):
        p = cli(sock, *args)
        assert p.returncode == 0, p.stderr
        rows = p.stdout.splitlines()
        assert rows[0].split()[:3] == ["IMAGE", "ID", "KIND"]
        assert [r.split()[0] for r in rows[1:]] == expected
        seen += expected
        if n == 2:
            assert p.stderr == ""  # the last page: no next one
            break
        prefix = "strata-client: more images; the next page: strata-client "
        assert p.stderr.startswith(prefix) and p.stderr.count("\n") == 1, p.stderr
        command = shlex.split(p.stderr[len(prefix):])
        assert command[:2] == ["-s", sock] and command[-2] == "--cursor"
        args = command[2:]
    assert seen == made

    p = cli(sock, "--json", "listImages", "repositoryId=pages", "--limit", "3")
    page = json.loads(p.stdout)
    assert [i["imageId"] for i in page["images"]] == made[:3] and page["nextCursor"]
    everything = json.loads(cli(sock, "--json", "listImages", "repositoryId=pages").stdout)
    p = cli(sock, "--json", "listImages", "repositoryId=pages", "--all-pages", "--limit", "2")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == everything and [i["imageId"] for i in everything] == made
    p = cli(sock, "listImages", "repositoryId=pages", "--all-pages")
    assert [r.split()[0] for r in p.stdout.splitlines()[1:]] == made

    p = cli(sock, "--json", "listImages", "repositoryId=pages", "--user-data", "vm=web",
            "--status", "optimized,degraded", "--kind", "disk")
    assert [i["imageId"] for i in json.loads(p.stdout)] == [made[1], made[3]]
    p = cli(sock, "--json", "listImages", "repositoryId=pages", "--user-data", "n=4",
            "--user-data", "vm")
    assert [i["imageId"] for i in json.loads(p.stdout)] == [made[4]]

    # Refusals: before sending (exit 2), or the agent's (exit 1), one line, nothing changed.
    for bad in (["--limit", "0"], ["--cursor", "x"], ["--user-data", "=1"]):
        p = cli(sock, "listImages", "repositoryId=pages", *bad)
        assert p.returncode == 2, (bad, p.stderr)
        one_error_line(p)
    p = cli(sock, "getHostInfo", "--limit", "2")
    assert p.returncode == 2 and "go with listImages" in one_error_line(p)
    for bad in (["--limit", "2", "--cursor", "bogus"], ["--status", "fine"],
                ["--limit", "10001"]):
        p = cli(sock, "listImages", "repositoryId=pages", *bad)
        assert p.returncode == 1, (bad, p.stderr)
        line = one_error_line(p)
        assert "(-32602): Invalid params: " in line, line
        assert "cursor" in line or "status" in line or "limit" in line, line
    assert json.loads(cli(sock, "--json", "listImages", "repositoryId=pages").stdout) \
        == everything

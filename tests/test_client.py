"""The CLI's pure parts: sizes, values, params against the packaged API document, rendering."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from rpc import (
    cliagent,
    client,
    clierrors,
    clihelp,
    cliparams,
    clirender,
    cliwatch,
    fixall,
    transport,
)

GiB = 1 << 30
IMAGE_ID = "0b7c1a52-52a3-4a4f-9d27-1b7d7a0c7f10"


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return clihelp.packaged_document()


def method(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return clihelp.find_method(doc, name)


# -- sizes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("4096", 4096),
    ("0", 0),
    ("512M", 512 << 20),
    ("10G", 10 * GiB),
    ("1T", 1 << 40),
    ("2P", 2 << 50),
    ("1.5G", 3 * GiB // 2),
    ("64MiB", 64 << 20),
    ("64MB", 64 << 20),
    ("8k", 8192),
    ("10g", 10 * GiB),
    ("4096B", 4096),
    (" 1 G ", GiB),
    (".5K", 512),
])
def test_parse_size(text: str, expected: int) -> None:
    assert cliparams.parse_size(text) == expected


@pytest.mark.parametrize("text", [
    "12Q", "", "G", "-1G", "1e9", "10GG", "1.3K", "0.1", "1,5G", "10 GiBs", "iB", "1..5G",
])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        cliparams.parse_size(text)


def test_bad_size_is_a_usage_error_naming_the_param(doc: dict[str, Any]) -> None:
    with pytest.raises(clierrors.UsageError, match=r"'size'.*'12Q'"):
        cliparams.assemble_params(method(doc, "createVirtualDisk"), {},
                                  ["targetRepoId=default", "size=12Q"])


@pytest.mark.parametrize("text, message", [
    ("abc", "'abc' is not a size"),
    ("-1", "'-1' is not a size"),
    ("1.5.5G", "'1.5.5G' is not a size"),
    ("10Q", "'10Q' is not a size"),
    ("0x10", "'0x10' is not a size"),
    ("1e9", "'1e9' is not a size"),
    ("true", "'true' is not a size"),
    ('{"a": 1}', "is not a size"),
    ("1.5", "'1.5' is not a whole number of bytes"),
    ("0", "0 bytes is less than the minimum, 512 bytes"),
    ("1000", "1000 bytes is not a multiple of 512 bytes"),
    ("0.75K", "768 bytes is not a multiple of 512 bytes"),
    ("1.5M1", "is not a size"),
    ("65T", "71468255805440 bytes (65 TiB) is more than the maximum, 70368744177664 bytes "
            "(64 TiB)"),
])
def test_every_bad_size_is_a_usage_error(doc: dict[str, Any], text: str, message: str) -> None:
    with pytest.raises(clierrors.UsageError) as e:
        cliparams.assemble_params(method(doc, "createVirtualDisk"), {},
                                  ["targetRepoId=default", f"size={text}"])
    assert str(e.value).startswith("bad size for param 'size': ") and message in str(e.value)


@pytest.mark.parametrize("value, message", [
    ({"a": 1}, '{"a": 1} is not a size'),
    ([1024], "[1024] is not a size"),
    (True, "true is not a size"),
    (None, "null is not a size"),
    (1.5, "1.5 is not a size"),
    (-1, "-1 bytes is less than the minimum"),
    (4097, "4097 bytes (4 KiB) is not a multiple of 512 bytes"),
    ("10Q", "'10Q' is not a size"),
])
def test_every_bad_size_from_a_file_is_a_usage_error(doc: dict[str, Any], value: Any,
                                                     message: str) -> None:
    with pytest.raises(clierrors.UsageError, match="bad size for param 'size': ") as e:
        cliparams.assemble_params(method(doc, "createVirtualDisk"),
                                  {"targetRepoId": "r1", "size": value}, [])
    assert message in str(e.value)


def test_a_bad_size_in_the_file_overridden_by_a_pair_is_not_used(doc: dict[str, Any]) -> None:
    params = cliparams.assemble_params(method(doc, "createVirtualDisk"),
                                       {"targetRepoId": "r1", "size": "oops"}, ["size=1G"])
    assert params["size"] == GiB


def test_bounds_are_sizes_too(doc: dict[str, Any]) -> None:
    m = method(doc, "createVirtualDisk")
    for text, size in (("512", 512), ("64T", 64 << 40), ("1.5K", 1536)):
        assert cliparams.assemble_params(m, {}, ["targetRepoId=r", f"size={text}"])["size"] == size


@pytest.mark.parametrize("pairs, name", [
    (["targetRepoId=default", "size=1G", "size=2G"], "size"),
    (["targetRepoId=default", "targetRepoId=default", "size=1G"], "targetRepoId"),
])
def test_a_repeated_param_is_a_usage_error(doc: dict[str, Any], pairs: list[str],
                                           name: str) -> None:
    with pytest.raises(clierrors.UsageError) as e:
        cliparams.assemble_params(method(doc, "createVirtualDisk"), {}, pairs)
    assert str(e.value).startswith(f"param {name!r} is given twice")


def test_size_param_is_found_by_the_document(doc: dict[str, Any]) -> None:
    params = cliparams.params_by_name(method(doc, "createVirtualDisk"))
    assert cliparams.is_size_param(params["size"])
    assert not cliparams.is_size_param(params["targetRepoId"])


# -- values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ('{"AutoFix": false}', {"AutoFix": False}),
    ("42", 42),
    ("1.5", 1.5),
    ("true", True),
    ("null", None),
    ("[1, 2]", [1, 2]),
    ('"quoted"', "quoted"),
    ("default", "default"),
    ("hello world", "hello world"),
    ("{not json", "{not json"),
    ("", ""),
])
def test_parse_value_is_json_or_string(text: str, expected: Any) -> None:
    assert cliparams.parse_value(text) == expected


def test_string_params_keep_the_text(doc: dict[str, Any]) -> None:
    m = method(doc, "getStorageRepositoryInfo")
    assert cliparams.assemble_params(m, {}, ["repoId=2024"]) == {"repoId": "2024"}
    assert cliparams.assemble_params(m, {}, ['repoId="r1"']) == {"repoId": "r1"}


def test_json_values_reach_object_params(doc: dict[str, Any]) -> None:
    params = cliparams.assemble_params(
        method(doc, "createVirtualDisk"), {},
        ["targetRepoId=default", "size=10G", "baseSnapshotId=null",
         'options={"AutoFix": false, "strategy": "performance"}', 'userData={"vm": "db1"}'],
    )
    assert params == {
        "targetRepoId": "default",
        "size": 10 * GiB,
        "baseSnapshotId": None,
        "options": {"AutoFix": False, "strategy": "performance"},
        "userData": {"vm": "db1"},
    }


def test_value_may_hold_equal_signs(doc: dict[str, Any]) -> None:
    params = cliparams.assemble_params(
        method(doc, "setImageUserData"), {},
        ["repositoryId=default", f"imageId={IMAGE_ID}", 'userData={"cmd": "a=b"}'],
    )
    assert params["userData"] == {"cmd": "a=b"}


def test_pair_without_equal_sign_is_a_usage_error(doc: dict[str, Any]) -> None:
    with pytest.raises(clierrors.UsageError, match="'default' is not name=value"):
        cliparams.assemble_params(method(doc, "listImages"), {}, ["default"])


# -- params: -f merging, unknown and missing names ------------------------------------------------


def test_file_params_are_overridden_by_pairs(doc: dict[str, Any]) -> None:
    base = {"targetRepoId": "r1", "size": "1G", "userData": {"a": 1}}
    params = cliparams.assemble_params(method(doc, "createVirtualDisk"), base,
                                       ["targetRepoId=r2", 'userData={"b": 2}'])
    assert params == {"targetRepoId": "r2", "size": GiB, "userData": {"b": 2}}


def test_file_size_in_bytes_is_kept(doc: dict[str, Any]) -> None:
    params = cliparams.assemble_params(method(doc, "createVirtualDisk"),
                                       {"targetRepoId": "r1", "size": 1048576}, [])
    assert params["size"] == 1048576


def test_pair_size_overrides_file_size(doc: dict[str, Any]) -> None:
    params = cliparams.assemble_params(method(doc, "createVirtualDisk"),
                                       {"targetRepoId": "r1", "size": 4096}, ["size=2G"])
    assert params["size"] == 2 * GiB


def test_unknown_param_lists_the_valid_names(doc: dict[str, Any]) -> None:
    with pytest.raises(clierrors.UsageError) as e:
        cliparams.assemble_params(method(doc, "createVirtualDisk"), {},
                                  ["targetRepoId=default", "size=1G", "sise=2G"])
    assert str(e.value) == (
        "unknown param 'sise' for createVirtualDisk "
        "(valid: targetRepoId, size, baseSnapshotId, userData, options)"
    )


def test_unknown_param_in_the_file_is_refused(doc: dict[str, Any]) -> None:
    with pytest.raises(clierrors.UsageError, match="unknown param 'repoId' for listImages"):
        cliparams.assemble_params(method(doc, "listImages"), {"repoId": "default"}, [])


def test_no_params_method_refuses_any(doc: dict[str, Any]) -> None:
    with pytest.raises(clierrors.UsageError, match=r"\(valid: none\)"):
        cliparams.assemble_params(method(doc, "getHostInfo"), {}, ["verbose=1"])


def test_missing_required_params_are_named(doc: dict[str, Any]) -> None:
    with pytest.raises(clierrors.UsageError, match="getImageStatus needs repositoryId, imageId"):
        cliparams.assemble_params(method(doc, "getImageStatus"), {}, [])


def test_load_params_file(tmp_path: Any) -> None:
    path = tmp_path / "p.json"
    path.write_text('{"repositoryId": "default"}')
    assert cliparams.load_params_file(str(path), io.StringIO()) == {"repositoryId": "default"}
    stdin = io.StringIO('{"imageId": "x"}')
    assert cliparams.load_params_file("-", stdin) == {"imageId": "x"}


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "must hold a JSON object"),
    ("{oops", "is not JSON"),
])
def test_load_params_file_rejects(tmp_path: Any, text: str, message: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(clierrors.UsageError, match=message):
        cliparams.load_params_file(str(path), io.StringIO())


def test_load_missing_params_file(tmp_path: Any) -> None:
    with pytest.raises(clierrors.UsageError, match="cannot read .*: No such file"):
        cliparams.load_params_file(str(tmp_path / "none.json"), io.StringIO())


# -- methods and help -----------------------------------------------------------------------------


def test_unknown_method_suggests_a_close_one(doc: dict[str, Any]) -> None:
    with pytest.raises(clierrors.UsageError, match="'listImage'; did you mean listImages"):
        clihelp.find_method(doc, "listImage")
    with pytest.raises(clierrors.UsageError, match="unknown method 'frobnicate'"):
        clihelp.find_method(doc, "frobnicate")


def test_discover_is_callable(doc: dict[str, Any]) -> None:
    assert clihelp.find_method(doc, "rpc.discover")["params"] == []


def test_method_list_has_every_method(doc: dict[str, Any]) -> None:
    text = clihelp.format_method_list(doc)
    for m in doc["methods"]:
        assert f"  {m['name']} " in text
        assert m["summary"] in text
    assert "rpc.discover" in text


def test_method_help(doc: dict[str, Any]) -> None:
    text = clihelp.format_method_help(doc, method(doc, "createVirtualDisk"))
    lines = text.splitlines()
    assert lines[0].startswith("createVirtualDisk: Create a disk")
    assert any(line.split()[:3] == ["targetRepoId", "string,", "required"] for line in lines)
    assert any(line.split()[:2] == ["size", "integer"] and "required" in line for line in lines)
    assert any(line.split()[0:1] == ["baseSnapshotId"] and "optional, default null" in line
               for line in lines)
    assert any("AutoFix" in line and "default true" in line for line in lines)
    assert "ImageNotFound (1200)" in text
    assert "RepositoryNotConnected (1100)" in text


def test_main_help_works_offline(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    sock = str(tmp_path / "none.sock")
    assert client.main(["-s", sock, "getImageStatus", "-h"]) == 0
    out = capsys.readouterr().out
    assert "repositoryId" in out and "imageId" in out and "ImageNotFound (1200)" in out
    assert client.main(["-s", sock, "-h"]) == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out and "createSnapshot" in out


def test_main_call_without_agent_exits_3(tmp_path: Any,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    sock = str(tmp_path / "none.sock")
    assert client.main(["-s", sock, "getHostInfo"]) == 3
    err = capsys.readouterr().err
    assert err == f"strata-client: cannot reach the agent at {sock}: No such file or directory\n"


@pytest.mark.parametrize("argv, message", [
    ([], "a METHOD is needed"),
    (["-s", "x", "-a", "h:1", "getHostInfo"], "not allowed with"),
    (["--timeout", "0", "getHostInfo"], "not a positive number"),
    (["--cert", "c.pem", "getHostInfo"], "go with -a"),
    (["-a", "localhost", "getHostInfo"], "bad address 'localhost'"),
    (["--bogus", "getHostInfo"], "unrecognized arguments"),
])
def test_main_usage_errors_exit_2(argv: list[str], message: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert client.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("strata-client: ") and message in err
    assert err.count("\n") == 1


def test_default_socket_from_environment() -> None:
    args = client.build_parser().parse_intermixed_args(["getHostInfo"])
    assert client.endpoint(args, {"STRATA_SOCKET": "/tmp/a.sock"}).socket == "/tmp/a.sock"
    assert client.endpoint(args, {}).socket == "/run/strata/agent.sock"
    args = client.build_parser().parse_intermixed_args(["-s", "/x.sock", "getHostInfo"])
    assert client.endpoint(args, {"STRATA_SOCKET": "/tmp/a.sock"}).socket == "/x.sock"


def test_options_and_pairs_intermix() -> None:
    args = client.build_parser().parse_intermixed_args(
        ["createVirtualDisk", "targetRepoId=r", "-f", "-", "size=1G", "--watch", "--json"])
    assert (args.method, args.params, args.params_file, args.watch, args.json) == (
        "createVirtualDisk", ["targetRepoId=r", "size=1G"], "-", True, True)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8443", ("127.0.0.1", 8443)),
    ("agent.example:443", ("agent.example", 443)),
    ("[::1]:8443", ("::1", 8443)),
])
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert cliagent.parse_address(text) == expected


# -- rendering ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (512, "512 B"), (1024, "1 KiB"), (64 << 20, "64 MiB"),
    (3 * GiB // 2, "1.5 GiB"), (1 << 40, "1 TiB"), (3 << 50, "3 PiB"), (5 << 60, "5120 PiB"),
])
def test_human_size(n: int, text: str) -> None:
    assert clirender.human_size(n) == text


def test_render_table_aligns_columns() -> None:
    cols = (clirender.Column("A", clirender.field("a")),
            clirender.Column("LONG NAME", clirender.field("b")))
    text = clirender.render_table([{"a": "xxxxx", "b": 1}, {"a": "y"}], cols)
    assert text.splitlines() == [
        "A      LONG NAME",
        "xxxxx  1",
        "y      -",
    ]


def test_list_images_table() -> None:
    rows = [
        {"imageId": IMAGE_ID, "kind": "snapshot", "size": 10 * GiB, "status": "optimized",
         "prepared": False, "parentId": None, "userData": {}},
        {"imageId": "9c3e", "kind": "disk", "size": 64 << 20, "status": "broken",
         "prepared": True, "parentId": IMAGE_ID},
    ]
    assert clirender.render_result("listImages", rows) == "\n".join([
        "IMAGE ID                              KIND      SIZE    STATUS     PREPARED  PARENT"
        "                                CREATED",
        f"{IMAGE_ID}  snapshot  10 GiB  optimized  no        -"
        "                                     -",
        f"9c3e                                  disk      64 MiB  broken     yes       {IMAGE_ID}"
        "  -",
    ])


def test_list_repositories_table() -> None:
    rows = [{"repoId": "default", "repoFormat": "localfs-1.0", "capacity": 1 << 40,
             "free": 3 * GiB // 2, "images": {"disk": 2, "snapshot": 1}}]
    assert clirender.render_result("listStorageRepositories", rows) == "\n".join([
        "REPO ID  FORMAT       CAPACITY  FREE     IMAGES",
        "default  localfs-1.0  1 TiB     1.5 GiB  disk=2 snapshot=1",
    ])


def test_check_repository_table() -> None:
    rows = [{"type": "mend", "data": "opaque", "imageIds": [IMAGE_ID, "b"],
             "description": "resume createVirtualDisk"}]
    assert clirender.render_result("checkStorageRepository", rows) == "\n".join([
        "TYPE  IMAGES                                  DESCRIPTION",
        f"mend  {IMAGE_ID},b  resume createVirtualDisk",
    ])
    assert clirender.render_result("checkStorageRepository", []) == "TYPE  IMAGES  DESCRIPTION"


def test_render_scalars_objects_and_json() -> None:
    assert clirender.render_result("createVirtualDisk", IMAGE_ID) == IMAGE_ID
    assert clirender.render_result("removeImage", None) is None
    assert clirender.render_result("getImageInfo", {
        "size": 64 << 20, "chain": ["a", "b"], "userData": {"k": 1}, "prepared": True,
        "last_error": None,
    }) == "\n".join([
        "size: 64 MiB (67108864 bytes)", "chain: a,b", 'userData: {"k":1}', "prepared: yes",
        "last_error: -",
    ])
    assert json.loads(
        clirender.render_result("createVirtualDisk", IMAGE_ID, True) or "") == IMAGE_ID
    assert clirender.render_result("removeImage", None, True) == "null"


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def paris(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Europe/Paris")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


CREATED = 1763857025.75  # 2025-11-23 00:17:05.75 UTC


@pytest.mark.usefixtures("utc")
def test_sizes_and_times_for_humans_and_raw_with_json() -> None:
    info = {"imageId": IMAGE_ID, "size": 20 * GiB, "allocated": 200704, "created": CREATED,
            "depth": 1}
    assert clirender.render_result("getImageInfo", info) == "\n".join([
        f"imageId: {IMAGE_ID}", "size: 20 GiB (21474836480 bytes)",
        "allocated: 196 KiB (200704 bytes)", "created: 2025-11-23 00:17:05+00:00", "depth: 1",
    ])
    assert json.loads(clirender.render_result("getImageInfo", info, True) or "") == info
    rows = [{"imageId": IMAGE_ID, "kind": "disk", "size": 512, "status": "optimized",
             "prepared": False, "parentId": None, "created": CREATED}]
    table = clirender.render_result("listImages", rows) or ""
    assert table.splitlines()[1].split()[-4:] == ["no", "-", "2025-11-23", "00:17:05+00:00"]
    assert "512 B" in table
    assert json.loads(clirender.render_result("listImages", rows, True) or "") == rows
    repo = {"capacity": 1 << 40, "free": 3 * GiB // 2, "images": {"disk": 2, "snapshot": 0}}
    assert clirender.render_result("getStorageRepositoryInfo", repo) == "\n".join([
        "capacity: 1 TiB (1099511627776 bytes)", "free: 1.5 GiB (1610612736 bytes)",
        "images: disk=2 snapshot=0"])
    assert clirender.render_result("getHostInfo", {"uptime": 3723.5}) == (
        "uptime: 3723.5 s (1 h 2 min)")
    assert clirender.render_result("getHostInfo", {"uptime": 0.179}) == "uptime: 0.179 s"


@pytest.mark.usefixtures("paris")
def test_times_are_local() -> None:
    assert clirender.time_text(CREATED) == "2025-11-23 01:17:05+01:00"
    assert clirender.time_text("not a time") == "not a time"
    assert clirender.time_text(None) == "-"


def test_remote_error_line() -> None:
    e = transport.RemoteError(1200, "image x is not in\nrepository 'default'",
                              {"name": "ImageNotFound"})
    assert clirender.remote_error_line(e) == (
        "ImageNotFound (1200): image x is not in repository 'default'")
    e = transport.RemoteError(-32602, "Invalid params: invalid parameter 'imageId'")
    assert clirender.remote_error_line(e) == (
        "InvalidParams (-32602): Invalid params: invalid parameter 'imageId'")
    assert clirender.remote_error_line(transport.RemoteError(-1, "odd")) == "error (-1): odd"


# -- watching -------------------------------------------------------------------------------------


def status(st: str, stage: str = "1/2", pct: int = -1, running: bool = True,
           error: str | None = None) -> dict[str, Any]:
    return {"imageId": IMAGE_ID, "status": st, "stage": stage, "percent_complete": pct,
            "last_error": error, "running": running, "operation": "copyImage"}


@pytest.mark.parametrize("s, outcome", [
    (status("optimized", "2/2", 100, False), True),
    (status("degraded", "2/2", 100, False), True),
    (status("broken", running=True), None),
    (status("broken", running=False), None),  # queued, or waiting: no error yet
    (status("broken", running=True, error="ENOSPC"), None),  # still stopping
    (status("broken", running=False, error="stopped by client"), False),
])
def test_watch_outcome(s: dict[str, Any], outcome: bool | None) -> None:
    assert cliwatch.watch_outcome(s) is outcome


def test_progress_line() -> None:
    assert cliwatch.progress_line(status("broken", "1/2", 50), width=10) == (
        "[#####.....]  50%  broken  stage 1/2  copyImage")
    assert cliwatch.progress_line(status("broken", "1/2", -1), width=4) == (
        "[????]   ?%  broken  stage 1/2  copyImage")


def test_check_watchable() -> None:
    cliwatch.check_watchable("copyImage", {})
    with pytest.raises(clierrors.UsageError, match="not listImages"):
        cliwatch.check_watchable("listImages", {})
    with pytest.raises(clierrors.UsageError, match="AutoFix=false"):
        cliwatch.check_watchable("createVirtualDisk", {"options": {"AutoFix": False}})


def test_watch_target() -> None:
    assert cliwatch.watch_target("getImageStatus", {"repositoryId": "r", "imageId": IMAGE_ID},
                                 {}) == ("r", IMAGE_ID)
    assert cliwatch.watch_target("createSnapshot", {"targetRepoId": "r2"}, IMAGE_ID) == (
        "r2", IMAGE_ID)


class _Scripted(cliagent.Agent):
    """An agent whose getImageStatus answers come from a list (no socket is touched)."""

    def __init__(self, answers: list[dict[str, Any]]) -> None:
        super().__init__(cliagent.Endpoint(socket="/nonexistent"), 1.0)
        self.answers: Iterator[dict[str, Any]] = iter(answers)
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def call(self, method: str, params: Mapping[str, Any]) -> Any:
        self.calls.append((method, dict(params)))
        return next(self.answers)


def test_watch_until_done_prints_each_change_once() -> None:
    agent = _Scripted([status("broken", "1/2", 0), status("broken", "1/2", 0),
                       status("broken", "1/2", 40), status("optimized", "2/2", 100, False)])
    err = io.StringIO()
    sleeps: list[float] = []
    final = cliwatch.watch(agent, "r", IMAGE_ID, cliwatch.Progress(err), sleeps.append)
    assert final["status"] == "optimized"
    assert agent.calls == [("getImageStatus", {"repositoryId": "r", "imageId": IMAGE_ID})] * 4
    assert sleeps == [0.5, 0.5, 0.5]
    lines = err.getvalue().splitlines()
    assert [line.split("]")[1].split()[:2] for line in lines] == [
        ["0%", "broken"], ["40%", "broken"], ["100%", "optimized"]]


def test_watch_failure() -> None:
    agent = _Scripted([status("broken", "1/2", 10),
                       status("broken", "1/2", 10, False, "No space left on device")])
    with pytest.raises(clierrors.WatchFailed, match="No space left on device"):
        cliwatch.watch(agent, "r", IMAGE_ID, cliwatch.Progress(io.StringIO()), lambda _: None)


def test_progress_redraws_one_line_on_a_tty() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    progress = cliwatch.Progress(out)
    progress.update(status("broken", "1/2", 10))
    progress.update(status("broken", "1/2", 10))
    progress.finish()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1


def test_module_docstring_documents_exit_codes() -> None:
    doc = client.__doc__ or ""
    for code in ("0", "1", "2", "3", "4"):
        assert f"\n    {code}  " in doc
    epilog = client.build_parser().format_help()
    for code in ("0", "1", "2", "3", "4"):
        assert f"\n  {code}  " in epilog


# -- fixStorageRepository --all -------------------------------------------------------------------


def test_fix_all_shows_each_fix_progress() -> None:
    mend = {"type": "mend", "imageIds": [IMAGE_ID], "description": "resume copyImage",
            "data": "m1"}
    merge = {"type": "merge", "imageIds": ["d1", "gone"], "description": "fold", "data": "g1"}
    checks = iter([[mend, merge], [merge], []])
    statuses = {
        IMAGE_ID: iter([status("broken", "1/2", 0), status("broken", "1/2", 0),
                        status("broken", "1/2", 60), status("optimized", "2/2", 100, False)]),
        "d1": iter([status("degraded", "1/3", 10), status("optimized", "2/2", 100, False)]),
    }
    calls: list[str] = []

    def call(method: str, params: Mapping[str, Any]) -> Any:
        calls.append(method)
        if method == "checkStorageRepository":
            return next(checks)
        if method == "fixStorageRepository":
            return {}
        if params["imageId"] == "gone":
            raise transport.RemoteError(1200, "gone", {"name": "ImageNotFound"})
        return next(statuses[params["imageId"]])

    out, err = io.StringIO(), io.StringIO()
    assert fixall.fix_all(call, "r", None, out, lambda _: None,
                          cliwatch.Progress(err)) == (2, 0, 0)
    assert out.getvalue().splitlines() == [
        "mend     resume copyImage", "merge    fold",
        "2 fix(es) applied, 0 failed, 0 finding(s) need a person"]
    shown = [line.split("]")[1].split()[:2] for line in err.getvalue().splitlines()]
    # Each change once (no TTY here), the second fix's from its start.
    assert shown == [["0%", "broken"], ["60%", "broken"], ["100%", "optimized"],
                     ["10%", "degraded"], ["100%", "optimized"]]


def test_fix_all_progress_redraws_on_a_tty() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    fix = {"type": "mend", "imageIds": [IMAGE_ID], "description": "d", "data": "m"}
    checks = iter([[fix], []])
    answers = iter([status("broken", "1/2", 5), status("broken", "1/2", 50),
                    status("optimized", "2/2", 100, False)])

    def call(method: str, params: Mapping[str, Any]) -> Any:
        if method == "checkStorageRepository":
            return next(checks)
        return {} if method == "fixStorageRepository" else next(answers)

    err = Tty()
    fixall.fix_all(call, "r", None, io.StringIO(), lambda _: None, cliwatch.Progress(err))
    text = err.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert " 50%" in text and "100%  optimized" in text

from __future__ import annotations

import datetime
import logging
import os
import pathlib
import re
from collections.abc import Iterator

import pytest

from agent import logsetup

LINE = re.compile(r"ts=(?P<ts>\S+) level=(?P<level>[A-Z]+) logger=(?P<logger>\S+) (?P<message>.*)")


@pytest.fixture(autouse=True)
def restore_root() -> Iterator[None]:
    """Undo setup(): its handlers hold pytest's capture stream, which closes after the test."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    level = root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    logging.captureWarnings(False)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


def test_lines_are_key_value(capsys: pytest.CaptureFixture[str]) -> None:
    logsetup.setup("INFO")
    logging.getLogger("agent.test").info("op=copy image=%s", "abc")
    logging.getLogger("agent.test").debug("hidden=1")
    out = lines(capsys.readouterr().err)
    assert len(out) == 1
    match = LINE.fullmatch(out[0])
    assert match, out[0]
    assert match["level"] == "INFO"
    assert match["logger"] == "agent.test"
    assert match["message"] == "op=copy image=abc"
    ts = datetime.datetime.fromisoformat(match["ts"])
    assert ts.utcoffset() == datetime.timedelta(0)
    now = datetime.datetime.now(datetime.UTC)
    assert abs((now - ts).total_seconds()) < 60


def test_level(capsys: pytest.CaptureFixture[str]) -> None:
    logsetup.setup("WARNING")
    log = logging.getLogger("agent.test")
    log.info("shown=no")
    log.warning("shown=yes")
    log.error("shown=yes")
    out = lines(capsys.readouterr().err)
    assert [LINE.fullmatch(line)["level"] for line in out] == ["WARNING", "ERROR"]  # type: ignore[index]


def test_file(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.log"
    logsetup.setup("DEBUG", file=str(path))
    logging.getLogger("agent.test").debug("step=1")
    written = lines(path.read_text())
    assert len(written) == 1
    assert LINE.fullmatch(written[0])
    assert written[0].endswith("level=DEBUG logger=agent.test step=1")
    # The same line goes to stderr too.
    assert lines(capsys.readouterr().err) == written


def test_file_follows_logrotate(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "agent.log"
    logsetup.setup("INFO", file=str(path))
    log = logging.getLogger("agent.test")
    log.info("step=1")
    os.rename(path, tmp_path / "agent.log.1")
    log.info("step=2")
    assert lines((tmp_path / "agent.log.1").read_text())[0].endswith("step=1")
    assert [line.rsplit(" ", 1)[1] for line in lines(path.read_text())] == ["step=2"]


def test_idempotent(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    path = tmp_path / "agent.log"
    logsetup.setup("INFO", file=str(path))
    after_first = len(root.handlers)
    logsetup.setup("INFO", file=str(path))
    assert len(root.handlers) == after_first == before + 2
    logging.getLogger("agent.test").info("once=1")
    assert len(lines(capsys.readouterr().err)) == 1
    assert len(lines(path.read_text())) == 1


def test_setup_again_changes_level_and_drops_file(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agent.log"
    logsetup.setup("ERROR", file=str(path))
    logsetup.setup("DEBUG")
    logging.getLogger("agent.test").debug("step=1")
    assert len(lines(capsys.readouterr().err)) == 1
    assert path.read_text() == ""


def test_bad_file_keeps_previous_setup(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logsetup.setup("INFO")
    with pytest.raises(FileNotFoundError):
        logsetup.setup("INFO", file=str(tmp_path / "missing" / "agent.log"))
    logging.getLogger("agent.test").info("still=1")
    assert lines(capsys.readouterr().err)[-1].endswith("still=1")

from __future__ import annotations

import dataclasses
import os
import pathlib
import re

import pytest

from agent import config, errors

EXAMPLE = pathlib.Path(__file__).parent.parent / "systemd" / "strata-agent.conf.example"


@pytest.fixture
def conf(tmp_path: pathlib.Path) -> pathlib.Path:
    """The main file's path in an empty directory; tests write it (and conf.d) themselves."""
    return tmp_path / "agent.conf"


def write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults() -> None:
    cfg = config.load(None)
    assert cfg == config.Config()
    assert cfg.host.id == 1
    assert cfg.rpc.socket == "/run/strata/agent.sock"
    assert cfg.rpc.tcp_address == ""
    assert cfg.rpc.tcp_port == 54323
    assert (cfg.rpc.tls_cert, cfg.rpc.tls_key, cfg.rpc.tls_ca) == ("", "", "")
    assert cfg.rpc.plain_tcp is False
    assert cfg.rpc.max_request_bytes == 1048576
    assert cfg.rpc.repository_threads == 4
    assert cfg.rpc.repository_call_timeout == 30
    assert cfg.agent.state_dir == "/var/lib/strata"
    assert cfg.agent.run_dir == "/run/strata"
    assert cfg.agent.workers == 4
    assert cfg.agent.rpc_threads == 16
    assert cfg.agent.resume_on_start is True
    assert cfg.log.level == "INFO"
    assert cfg.log.file == ""


def test_config_is_frozen() -> None:
    cfg = config.load(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.agent.workers = 8  # type: ignore[misc]


def test_empty_file_gives_defaults(conf: pathlib.Path) -> None:
    write(conf, "# nothing set\n")
    cfg = config.load(str(conf))
    assert cfg == config.Config()
    assert cfg.sources == (str(conf),)


def test_file_values(conf: pathlib.Path) -> None:
    write(
        conf,
        "[host]\nid = 2000\n"
        "[rpc]\nsocket = /run/other/agent.sock\nmax_request_bytes = 4096\n"
        "[agent]\nstate_dir = /srv/strata\nworkers = 64\nrpc_threads = 1\n"
        "[log]\nlevel = debug\nfile = /var/log/strata/agent.log\n",
    )
    cfg = config.load(str(conf))
    assert cfg.host.id == 2000
    assert cfg.rpc.socket == "/run/other/agent.sock"
    assert cfg.rpc.max_request_bytes == 4096
    assert cfg.agent == config.Agent(state_dir="/srv/strata", workers=64, rpc_threads=1)
    # Levels are case-insensitive and stored in the spelling logging wants.
    assert cfg.log == config.Log(level="DEBUG", file="/var/log/strata/agent.log")


def test_drop_ins_override_in_sorted_order(conf: pathlib.Path) -> None:
    write(conf, "[agent]\nworkers = 2\nrpc_threads = 3\n[log]\nlevel = ERROR\n")
    conf_d = conf.parent / "conf.d"
    # Written out of order: the name decides, not the creation time.
    write(conf_d / "20-later.conf", "[agent]\nworkers = 9\n")
    write(conf_d / "10-first.conf", "[agent]\nworkers = 5\n[host]\nid = 7\n")
    # Only *.conf counts: editor backups and disabled files are ignored.
    write(conf_d / "30-disabled.conf.off", "[agent]\nworkers = 1\n")
    write(conf_d / "40-backup.conf~", "[agent]\nworkers = 1\n")
    cfg = config.load(str(conf))
    assert cfg.agent.workers == 9
    assert cfg.agent.rpc_threads == 3
    assert cfg.host.id == 7
    assert cfg.log.level == "ERROR"
    assert cfg.sources == (
        str(conf),
        str(conf_d / "10-first.conf"),
        str(conf_d / "20-later.conf"),
    )


def test_missing_main_file_is_an_error(conf: pathlib.Path) -> None:
    with pytest.raises(config.ConfigError) as e:
        config.load(str(conf))
    assert str(e.value) == f"{conf}: cannot read: No such file or directory"


def test_config_error_is_a_strata_error() -> None:
    assert issubclass(config.ConfigError, errors.Error)
    assert config.ConfigError.code == 1002
    assert config.ConfigError.name == "ConfigError"


@pytest.mark.parametrize(
    "section,key,value,expect",
    [
        ("host", "id", "0", "an integer from 1 to 2000"),
        ("host", "id", "2001", "an integer from 1 to 2000"),
        ("rpc", "socket", "agent.sock", "an absolute path"),
        ("rpc", "socket", "/" + "s" * 107, "an absolute path of at most 107 bytes"),
        ("rpc", "tcp_address", "storage.example.com", "an IP address"),
        ("rpc", "tcp_port", "0", "an integer from 1 to 65535"),
        ("rpc", "tcp_port", "65536", "an integer from 1 to 65535"),
        ("rpc", "tls_cert", "certs/agent.pem", "an absolute path or empty"),
        ("rpc", "tls_key", "key.pem", "an absolute path or empty"),
        ("rpc", "tls_ca", "ca.pem", "an absolute path or empty"),
        ("rpc", "plain_tcp", "maybe", "a boolean"),
        ("rpc", "max_request_bytes", "1M", "an integer from 1024 to 1073741824"),
        ("agent", "state_dir", "", "an absolute path"),
        ("agent", "state_dir", "var/lib/strata", "an absolute path"),
        ("agent", "workers", "many", "an integer from 1 to 64"),
        ("agent", "workers", "65", "an integer from 1 to 64"),
        ("agent", "workers", "4.5", "an integer from 1 to 64"),
        ("agent", "workers", "4 # four", "an integer from 1 to 64"),
        ("agent", "workers", "0x10", "an integer from 1 to 64"),
        ("agent", "rpc_threads", "257", "an integer from 1 to 256"),
        ("log", "level", "TRACE", "one of DEBUG, INFO, WARNING, ERROR"),
        ("log", "file", "agent.log", "an absolute path or empty"),
    ],
)
def test_bad_value(conf: pathlib.Path, section: str, key: str, value: str, expect: str) -> None:
    write(conf, f"[{section}]\n{key} = {value}\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(str(conf))
    message = str(e.value)
    assert message.startswith(f"{conf}: [{section}] {key}: expected {expect}")
    assert message.endswith(f", got {value!r}")
    assert e.value.data == {"file": str(conf), "section": section, "key": key, "value": value}


def test_bad_value_names_the_drop_in(conf: pathlib.Path) -> None:
    write(conf, "[agent]\nworkers = 4\n")
    drop_in = write(conf.parent / "conf.d" / "50-tuning.conf", "[agent]\nworkers = many\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(str(conf))
    assert str(e.value) == (
        f"{drop_in}: [agent] workers: expected an integer from 1 to 64, got 'many'"
    )


def test_bad_value_overridden_later_is_still_an_error(conf: pathlib.Path) -> None:
    # Every mistake is reported, not only those that happen to be effective.
    write(conf, "[agent]\nworkers = many\n")
    write(conf.parent / "conf.d" / "50-tuning.conf", "[agent]\nworkers = 8\n")
    with pytest.raises(config.ConfigError, match=re.escape(f"{conf}: [agent] workers")):
        config.load(str(conf))


@pytest.mark.parametrize(
    "spelling,value",
    [
        ("yes", True),
        ("On", True),
        ("1", True),
        ("TRUE", True),
        ("no", False),
        ("off", False),
        ("0", False),
        ("False", False),
    ],
)
def test_bool_spellings(conf: pathlib.Path, spelling: str, value: bool) -> None:
    # plain_tcp = true needs a loopback address to be accepted.
    address = "tcp_address = 127.0.0.1\n" if value else ""
    write(conf, f"[rpc]\nplain_tcp = {spelling}\n{address}")
    assert config.load(str(conf)).rpc.plain_tcp is value


def test_unknown_key(conf: pathlib.Path) -> None:
    write(conf, "[agent]\nworker = 4\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(str(conf))
    assert str(e.value) == (
        f"{conf}: [agent] worker: unknown key; known keys: "
        "max_chain_depth, quick_workers, request_ttl, resume_on_start, rpc_threads, run_dir, "
        "state_dir, workers"
    )
    assert e.value.data == {"file": str(conf), "section": "agent", "key": "worker"}


def test_unknown_section(conf: pathlib.Path) -> None:
    write(conf, "[agnet]\nworkers = 4\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(str(conf))
    assert str(e.value) == f"{conf}: unknown section [agnet]; known sections: agent, host, log, rpc"


def test_default_section_refused(conf: pathlib.Path) -> None:
    # configparser would copy [DEFAULT] keys into every section.
    write(conf, "[DEFAULT]\nworkers = 4\n")
    with pytest.raises(config.ConfigError, match=re.escape(f"{conf}: unknown section [DEFAULT]")):
        config.load(str(conf))


@pytest.mark.parametrize(
    "text,message",
    [
        ("workers = 4\n", "line 1: a key before any [section]: 'workers = 4'"),
        ("[agent]\nworkers = 4\nworkers = 5\n", "line 3: [agent] workers: set twice in this file"),
        ("[agent]\n[agent]\n", "line 2: [agent] appears twice in this file"),
        ("[agent]\nworkers 4\n", "line 2: not 'key = value' or '[section]': 'workers 4\\n'"),
    ],
)
def test_syntax_errors(conf: pathlib.Path, text: str, message: str) -> None:
    write(conf, text)
    with pytest.raises(config.ConfigError) as e:
        config.load(str(conf))
    assert str(e.value) == f"{conf}: {message}"


def test_percent_is_not_interpolation(conf: pathlib.Path) -> None:
    write(conf, "[agent]\nstate_dir = /srv/100%(x)s\n")
    assert config.load(str(conf)).agent.state_dir == "/srv/100%(x)s"


def test_tcp_without_tls_refused(conf: pathlib.Path) -> None:
    write(conf, "[rpc]\ntcp_address = 0.0.0.0\ntls_cert = /etc/pki/strata/agent.pem\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(str(conf))
    message = str(e.value)
    assert message.startswith(f"{conf}: [rpc] tcp_address: TCP requires TLS")
    assert "tls_key, tls_ca" in message
    assert "tls_cert," not in message


def test_tcp_with_tls(conf: pathlib.Path) -> None:
    write(
        conf,
        "[rpc]\ntcp_address = ::\ntcp_port = 8443\n"
        "tls_cert = /etc/pki/strata/agent.pem\ntls_key = /etc/pki/strata/agent.key\n"
        "tls_ca = /etc/pki/strata/ca.pem\n",
    )
    rpc = config.load(str(conf)).rpc
    assert (rpc.tcp_address, rpc.tcp_port, rpc.plain_tcp) == ("::", 8443, False)
    assert rpc.tls_ca == "/etc/pki/strata/ca.pem"


def test_tcp_in_drop_in_without_tls_names_the_drop_in(conf: pathlib.Path) -> None:
    write(conf, "[rpc]\n")
    drop_in = write(conf.parent / "conf.d" / "tcp.conf", "[rpc]\ntcp_address = 10.0.0.5\n")
    with pytest.raises(config.ConfigError, match=re.escape(f"{drop_in}: [rpc] tcp_address")):
        config.load(str(conf))


@pytest.mark.parametrize("address", ["0.0.0.0", "10.0.0.1", "::", ""])
def test_plain_tcp_off_loopback_refused(conf: pathlib.Path, address: str) -> None:
    write(conf, f"[rpc]\ntcp_address = {address}\nplain_tcp = yes\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(str(conf))
    assert str(e.value).startswith(
        f"{conf}: [rpc] plain_tcp: plain TCP is allowed only on a loopback tcp_address"
    )


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1"])
def test_plain_tcp_on_loopback_accepted(conf: pathlib.Path, address: str) -> None:
    write(conf, f"[rpc]\ntcp_address = {address}\nplain_tcp = true\n")
    rpc = config.load(str(conf)).rpc
    assert rpc.plain_tcp is True
    assert rpc.tcp_address == address


def test_plain_tcp_with_tls_refused(conf: pathlib.Path) -> None:
    write(conf, "[rpc]\ntcp_address = 127.0.0.1\nplain_tcp = yes\ntls_cert = /c.pem\n")
    with pytest.raises(config.ConfigError, match="plain TCP contradicts tls_cert"):
        config.load(str(conf))


def test_dev(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = config.dev(".strata-dev")
    base = tmp_path / ".strata-dev"
    assert cfg.rpc.socket == str(base / "agent.sock")
    assert cfg.agent.state_dir == str(base / "state")
    assert cfg.agent.run_dir == str(base / "run")
    assert cfg.log.file == ""
    assert cfg.host.id == 1
    # Everything else keeps its default: no TCP in development.
    assert cfg.rpc.tcp_address == ""
    assert cfg.agent.workers == config.Agent().workers


def test_dev_socket_path_too_long(tmp_path: pathlib.Path) -> None:
    directory = tmp_path / ("d" * 120)
    with pytest.raises(config.ConfigError) as e:
        config.dev(str(directory))
    assert str(e.value).startswith(
        f"--dev {directory}: [rpc] socket: expected an absolute path of at most 107 bytes"
    )


def test_dump_lists_every_key(conf: pathlib.Path) -> None:
    text = config.dump(config.load(None))
    assert "[rpc]\nsocket = /run/strata/agent.sock\ntcp_address =\n" in text
    for section in dataclasses.fields(config.Config):
        if section.name == "sources":
            continue
        assert f"[{section.name}]\n" in text
        values = getattr(config.Config(), section.name)
        for field in dataclasses.fields(values):
            assert re.search(rf"^{field.name} =", text, re.MULTILINE), field.name


def test_dump_round_trips(conf: pathlib.Path) -> None:
    write(
        conf,
        "[host]\nid = 42\n"
        "[rpc]\ntcp_address = 127.0.0.1\ntcp_port = 9000\nplain_tcp = on\n"
        "max_request_bytes = 65536\n"
        "[agent]\nstate_dir = /srv/strata//state/\nworkers = 2\n"
        "[log]\nlevel = warning\nfile = /var/log/strata.log\n",
    )
    cfg = config.load(str(conf))
    assert cfg.agent.state_dir == "/srv/strata/state"
    text = config.dump(cfg)
    assert f"# read from: {conf}\n" in text
    copy = write(conf.parent / "copy" / "agent.conf", text)
    again = config.load(str(copy))
    assert again == cfg
    assert config.dump(again) == text.replace(str(conf), str(copy))


def test_dump_round_trips_dev(tmp_path: pathlib.Path) -> None:
    cfg = config.dev(str(tmp_path / "dev"))
    copy = write(tmp_path / "etc" / "agent.conf", config.dump(cfg))
    assert config.load(str(copy)) == cfg


def test_example_config_loads_as_defaults() -> None:
    cfg = config.load(str(EXAMPLE))
    assert cfg == config.Config()


def test_example_config_documents_every_default(tmp_path: pathlib.Path) -> None:
    # The example shows every key commented out as "#key = default"; switched on, the values must
    # still be the defaults, and no key may be missing.
    text = EXAMPLE.read_text()
    enabled = re.sub(r"^#(?=[a-z_]+ =)", "", text, flags=re.MULTILINE)
    path = write(tmp_path / "agent.conf", enabled)
    assert config.load(str(path)) == config.Config()
    shown = set(re.findall(r"^([a-z_]+) =", enabled, re.MULTILINE))
    keys = {
        field.name
        for section in dataclasses.fields(config.Config)
        if section.name != "sources"
        for field in dataclasses.fields(getattr(config.Config(), section.name))
    }
    assert shown == keys


def test_unreadable_file(conf: pathlib.Path) -> None:
    conf.mkdir()
    with pytest.raises(config.ConfigError, match=re.escape(f"{conf}: cannot read: ")):
        config.load(str(conf))


def test_not_utf8(conf: pathlib.Path) -> None:
    conf.write_bytes(b"[log]\nfile = /var/log/\xff\n")
    with pytest.raises(config.ConfigError, match=re.escape(f"{conf}: not UTF-8 text")):
        config.load(str(conf))


def test_relative_main_path(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "agent.conf", "[agent]\nworkers = 2\n")
    write(tmp_path / "conf.d" / "a.conf", "[agent]\nworkers = 3\n")
    monkeypatch.chdir(tmp_path)
    assert config.load("agent.conf").agent.workers == 3
    assert os.path.basename(config.load("agent.conf").sources[1]) == "a.conf"

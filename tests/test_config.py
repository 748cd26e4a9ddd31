"""esperd's TOML config: defaults, validation messages, environment overrides, the example file."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from esperd.config import (
    ENV_OVERRIDES,
    Config,
    ConfigError,
    LimitsConfig,
    NatsConfig,
    ServiceConfig,
    TlsConfig,
    config_from_dict,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "esperd.toml"


def write(tmp_path: Path, text: str, name: str = "esperd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    message = str(info.value)
    assert str(path) in message, f"the error should name the file: {message}"
    return message


# ------------------------------------------------------------------ the example


def test_example_config_loads_with_embedded_broker() -> None:
    config = load_config(EXAMPLE, env={})
    assert isinstance(config, Config)
    assert config.nats.embedded is True
    assert config.nats.servers == ("nats://127.0.0.1:4222",)
    assert config.nats.embedded_host == "127.0.0.1"
    assert config.nats.embedded_port == 4222


def _struct_fields(cls: type) -> list[msgspec.structs.FieldInfo]:
    return list(msgspec.structs.fields(cls))


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _section_text(text: str, dotted: str) -> str:
    """The lines of one `[a.b]` table of a TOML text, comments included."""
    lines = text.splitlines()
    header = re.compile(r"^\s*\[\s*" + re.escape(dotted) + r"\s*\]\s*(#.*)?$")
    out: list[str] = []
    inside = False
    for line in lines:
        if re.match(r"^\s*\[", line):
            inside = bool(header.match(line))
            continue
        if inside:
            out.append(line)
    return "\n".join(out)


def _missing_keys(cls: type, table: Any, text: str, path: tuple[str, ...]) -> list[str]:
    missing: list[str] = []
    for field in _struct_fields(cls):
        dotted = ".".join((*path, field.encode_name))
        if _is_struct(field.type):
            sub = table.get(field.encode_name) if isinstance(table, dict) else None
            if not isinstance(sub, dict):
                missing.append(f"[{dotted}]")
                sub = {}
            missing += _missing_keys(field.type, sub, text, (*path, field.encode_name))
            continue
        if isinstance(table, dict) and field.encode_name in table:
            continue
        # TOML cannot spell None: a key whose default is None may be shown commented out.
        commented = re.compile(r"^\s*#\s*" + re.escape(field.encode_name) + r"\s*=", re.MULTILINE)
        if field.default is None and path and commented.search(_section_text(text, ".".join(path))):
            continue
        missing.append(dotted)
    return missing


def test_example_lists_every_key_of_every_section() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    raw = tomllib.loads(text)
    missing = _missing_keys(Config, raw, text, ())
    assert missing == [], f"examples/esperd.toml lacks: {', '.join(missing)}"


def test_example_key_walk_sees_nested_sections() -> None:
    # Guard for the test above: the walk must descend into [nats.tls] and name its keys.
    missing = _missing_keys(Config, {}, "", ())
    assert "[nats]" in missing and "[nats.tls]" in missing
    assert {"nats.tls.ca_file", "nats.servers", "limits.max_nodes", "service.state_dir"} <= set(missing)


def _differences(value: Any, default: Any, path: str) -> list[str]:
    if _is_struct(type(default)) and _is_struct(type(value)):
        diffs: list[str] = []
        for field in _struct_fields(type(default)):
            diffs += _differences(
                getattr(value, field.name),
                getattr(default, field.name),
                f"{path}.{field.name}" if path else field.name,
            )
        return diffs
    if default is None and value in ("", None):
        return []  # TOML cannot spell None; the example shows "" ("empty = none")
    return [] if value == default else [f"{path} = {value!r} (default {default!r})"]


def test_example_values_are_the_defaults_except_embedded() -> None:
    # The example's header: "the values shown are the defaults unless a comment says otherwise".
    config = load_config(EXAMPLE, env={})
    diffs = _differences(config, Config(), "")
    # Each difference is commented in the file: embedded for a broker-less fresh machine,
    # the short cooldown for the demo's half-second epochs.
    assert diffs == ["nats.embedded = True (default False)", "scheduler.cooldown_s = 3.0 (default 30.0)"]


# ------------------------------------------------------------------ defaults


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), env={})
    assert config == Config()
    assert config.nats.servers == ("nats://127.0.0.1:4222",)
    assert config.nats.embedded is False
    assert config.nats.subject_prefix == "esper"
    assert config.nats.tls == TlsConfig()
    assert config.nats.tls.enabled is False
    assert config.limits == LimitsConfig()
    assert config.service == ServiceConfig()
    assert config.service.log_format == "auto"


def test_none_path_gives_defaults() -> None:
    assert load_config(None, env={}) == Config()


def test_comment_only_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing here\n\n"), env={}) == Config()


def test_partial_sections_keep_other_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[nats]\nname = "x"\n[nats.tls]\nca_file = "/ca.pem"\n'), env={})
    assert config.nats.name == "x"
    assert config.nats.tls.ca_file == "/ca.pem"
    assert config.nats.tls.enabled is True
    assert config.nats.servers == NatsConfig().servers
    assert config.limits == LimitsConfig()


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), env={})
    with pytest.raises(AttributeError):
        config.nats = NatsConfig()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.nats.embedded = True  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.nats.tls.ca_file = "x"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.limits.max_nodes = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.service.state_dir = "/"  # type: ignore[misc]


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("[nats]\nembedded_port = 70000\n", "nats.embedded_port", "70000"),
        ("[nats]\nembedded_port = -1\n", "nats.embedded_port", "-1"),
        ("[limits]\nmax_nodes = 0\n", "limits.max_nodes", "0"),
        ("[limits]\nmax_batch_signals = -5\n", "limits.max_batch_signals", "-5"),
        ("[limits]\nreject_log_interval_s = 0.0\n", "limits.reject_log_interval_s", "0.0"),
        ("[nats]\nconnect_timeout_s = -1.5\n", "nats.connect_timeout_s", "-1.5"),
        ("[service]\ndrain_timeout_s = 0\n", "service.drain_timeout_s", "0"),
        ('[nats]\nsubject_prefix = "a..b"\n', "nats.subject_prefix", "'a..b'"),
        ('[service]\nlog_level = "loud"\n', "service.log_level", "'loud'"),
        ('[service]\nlog_format = "xml"\n', "service.log_format", "'xml'"),
    ],
)
def test_out_of_range_names_key_and_value(tmp_path: Path, text: str, key: str, value: str) -> None:
    message = error_of(tmp_path, text)
    assert f"`{key}`" in message
    assert f"= {value}" in message


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ('[nats]\nservers = "nats://x:4222"\n', "nats.servers", "'nats://x:4222'"),
        ("[nats]\nservers = [1]\n", "nats.servers.0", "1"),
        ('[nats]\nembedded = "yes"\n', "nats.embedded", "'yes'"),
        ("[nats]\nembedded_port = true\n", "nats.embedded_port", "True"),
        ('[limits]\nmax_nodes = "many"\n', "limits.max_nodes", "'many'"),
        ("[service]\nstate_dir = 3\n", "service.state_dir", "3"),
        ("[nats.tls]\nca_file = false\n", "nats.tls.ca_file", "False"),
        ("nats = 5\n", "nats", "5"),
    ],
)
def test_wrong_type_names_key_and_value(tmp_path: Path, text: str, key: str, value: str) -> None:
    message = error_of(tmp_path, text)
    assert f"`{key}`" in message
    assert f"= {value}" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("bogus = 1\n", "bogus"),
        ("[sevice]\nstate_dir = '/tmp'\n", "sevice"),
        ("[nats]\nserver = ['nats://x:1']\n", "nats.server"),
        ("[limits]\nmax_node = 3\n", "limits.max_node"),
        ("[service]\nlog_levle = 'debug'\n", "service.log_levle"),
        ("[nats.tls]\nca = '/ca.pem'\n", "nats.tls.ca"),
    ],
)
def test_unknown_key_is_an_error_naming_it(tmp_path: Path, text: str, key: str) -> None:
    message = error_of(tmp_path, text)
    assert f"unknown key `{key}`" in message


def test_config_from_dict_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^my-source: unknown key `nope`"):
        config_from_dict({"nope": 1}, source="my-source")


def test_invalid_toml_is_a_config_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[nats\nservers = \n")
    assert "not valid TOML" in message


def test_duplicate_key_is_a_config_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, "[nats]\nname = 'a'\nname = 'b'\n")
    assert "not valid TOML" in message


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    # TOML is UTF-8 by definition: a binary or Latin-1 file is invalid config, not a crash.
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[nats]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(path) in str(info.value)
    assert "No such file" in str(info.value)


def test_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path, env={})


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------ environment


def test_env_nats_url_is_a_comma_separated_list() -> None:
    config = load_config(None, env={"ESPERD_NATS_URL": " nats://a:4222, nats://b:4223 ,,tls://c:4443"})
    assert config.nats.servers == (
        "nats://a:4222",
        "nats://b:4223",
        "tls://c:4443",
    )


def test_env_single_url() -> None:
    config = load_config(None, env={"ESPERD_NATS_URL": "nats://only:1"})
    assert config.nats.servers == ("nats://only:1",)


def test_env_credentials_and_state_dir(tmp_path: Path) -> None:
    env = {
        "ESPERD_NATS_USER": "alice",
        "ESPERD_NATS_PASSWORD": "s3cret",
        "ESPERD_NATS_TOKEN": "tok",
        "ESPERD_NATS_CREDS": "/etc/esperd/esperd.creds",
        "ESPERD_NATS_NKEY_SEED": "/etc/esperd/seed.nk",
        "ESPERD_STATE_DIR": str(tmp_path / "state"),
    }
    config = load_config(write(tmp_path, ""), env=env)
    assert config.nats.user == "alice"
    assert config.nats.password == "s3cret"
    assert config.nats.token == "tok"
    assert config.nats.credentials_file == "/etc/esperd/esperd.creds"
    assert config.nats.nkey_seed_file == "/etc/esperd/seed.nk"
    assert config.service.state_dir == str(tmp_path / "state")
    # Nothing else moved.
    assert config.nats.servers == NatsConfig().servers
    assert config.service.log_level == ServiceConfig().log_level


def test_every_documented_env_var_is_honoured() -> None:
    assert set(ENV_OVERRIDES) == {
        "ESPERD_NATS_URL",
        "ESPERD_NATS_USER",
        "ESPERD_NATS_PASSWORD",
        "ESPERD_NATS_TOKEN",
        "ESPERD_NATS_CREDS",
        "ESPERD_NATS_NKEY_SEED",
        "ESPERD_STATE_DIR",
    }


def test_env_overrides_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[nats]\nservers = ["nats://file:1"]\nuser = "file-user"\n[service]\nstate_dir = "/from/file"\n',
    )
    config = load_config(
        path,
        env={
            "ESPERD_NATS_URL": "nats://env:2",
            "ESPERD_NATS_USER": "env-user",
            "ESPERD_STATE_DIR": "/from/env",
        },
    )
    assert config.nats.servers == ("nats://env:2",)
    assert config.nats.user == "env-user"
    assert config.service.state_dir == "/from/env"


def test_empty_env_value_does_not_override(tmp_path: Path) -> None:
    path = write(tmp_path, '[nats]\nuser = "file-user"\n')
    config = load_config(path, env={"ESPERD_NATS_USER": "", "ESPERD_NATS_URL": ""})
    assert config.nats.user == "file-user"
    assert config.nats.servers == NatsConfig().servers


def test_explicit_env_ignores_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESPERD_NATS_USER", "from-process")
    assert load_config(None, env={}).nats.user == ""
    assert load_config(None).nats.user == "from-process"


def test_env_override_into_a_non_table_section_is_a_config_error(tmp_path: Path) -> None:
    # `nats = 5` is a bad value; with ESPERD_NATS_URL set it must still be reported as one.
    message = error_of(tmp_path, "nats = 5\n", env={"ESPERD_NATS_URL": "nats://a:1"})
    assert "`nats`" in message


def test_servers_default_is_immutable_and_never_empty() -> None:
    assert isinstance(Config().nats.servers, tuple)
    with pytest.raises(ConfigError, match="nats.servers"):
        config_from_dict({"nats": {"servers": []}})


def test_max_payload_bytes_is_capped_at_what_nats_can_carry(tmp_path: Path) -> None:
    # The embedded broker is started with this as its max_payload; nats-server refuses > 64 MiB.
    assert config_from_dict({"limits": {"max_payload_bytes": 64 * 1024 * 1024}}).limits.max_payload_bytes
    message = error_of(tmp_path, "[limits]\nmax_payload_bytes = 67108865\n")
    assert "limits.max_payload_bytes" in message and "67108865" in message


def test_command_encoding_takes_three_values(tmp_path: Path) -> None:
    assert config_from_dict({}).nats.command_encoding == "auto"
    for mode in ("auto", "msgpack", "json"):
        assert config_from_dict({"nats": {"command_encoding": mode}}).nats.command_encoding == mode
    message = error_of(tmp_path, "[nats]\ncommand_encoding = 'xml'\n")
    assert "nats.command_encoding" in message and "'xml'" in message


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("nats//localhost:4222", "not a server URL"),
        ("http://127.0.0.1:4222", "scheme 'http'"),
        ("nats://127.0.0.1:port", "port is not a number"),
        ("nats://127.0.0.1:70000", "port is not a number"),
        ("nats://127.0.0.1:0", "port is not a number"),
        ("nats://:4222", "no host"),
        ("nats://127.0.0.1:4222/esper", "no path"),
        ("nats://127.0.0.1 :4222", "whitespace"),
        ("", "empty"),
    ],
)
def test_a_malformed_server_url_is_refused(tmp_path: Path, url: str, why: str) -> None:
    message = error_of(tmp_path, f"[nats]\nservers = [{url!r}]\n".replace("'", '"'))
    assert "`nats.servers`" in message and why in message


@pytest.mark.parametrize(
    "url",
    [
        "nats://127.0.0.1:4222",
        "tls://nats.example.com:4443",
        "nats://u:p@h:1",
        "127.0.0.1:4222",
        "localhost",
        "nats://[::1]:4222",
    ],
)
def test_server_urls_nats_py_takes_are_accepted(url: str) -> None:
    assert config_from_dict({"nats": {"servers": [url]}}).nats.servers == (url,)


def test_a_malformed_url_from_the_environment_is_refused_without_its_password(tmp_path: Path) -> None:
    message = error_of(tmp_path, "", env={"ESPERD_NATS_URL": "nats://bob:hunter2@broker:42x2"})
    assert "`nats.servers`" in message and "hunter2" not in message and "bob:***@broker" in message


def test_websocket_and_nats_urls_cannot_mix() -> None:
    with pytest.raises(ConfigError, match="mixes websocket"):
        config_from_dict({"nats": {"servers": ["ws://a:80", "nats://b:4222"]}})

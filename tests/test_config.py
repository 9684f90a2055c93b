"""Options, environment variables and the one-line start-up errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from anonticket.config import (
    SETTINGS,
    ConfigError,
    Options,
    check_internal_endpoint,
    check_public_endpoint,
    check_tor_control,
    from_options,
    onion_port,
)


def parse(args: list[str], env: dict[str, str] | None = None):
    options = Options()
    options.parseOptions(args)
    return from_options(options, environ=env or {})


TCP = ["--public", "tcp:8080:interface=127.0.0.1"]


def test_defaults():
    config = parse([*TCP, "--no-monitor"])
    assert config.data_dir == Path("./anonticket-data")
    assert config.database == "sqlite:///anonticket-data/anonticket.sqlite3"
    assert config.internal == "tcp:9180:interface=127.0.0.1"
    assert config.wallet_rpc == "http://127.0.0.1:18083"
    assert (config.min_confirmations, config.min_amount) == (10, 10_000_000_000)
    assert (config.start_height, config.poll_interval) == (0, 5.0)
    assert config.tor_control is None and config.wallet_rpc_login is None
    assert config.monitor is False


def test_every_option_reads_its_environment_variable_and_the_command_line_wins():
    env = {
        "ANONTICKET_DATA_DIR": " /srv/at ",
        "ANONTICKET_MIN_CONFIRMATIONS": " 12 ",
        "ANONTICKET_MIN_AMOUNT": "2000000",
        "ANONTICKET_START_HEIGHT": "77",
        "ANONTICKET_POLL_INTERVAL": "10",
        "ANONTICKET_WALLET_RPC": "http://127.0.0.1:28083/json_rpc",
        "ANONTICKET_WALLET_RPC_LOGIN": "monitor:s3cret",
        "ANONTICKET_TOR_CONTROL": "unix:/run/tor/control",
        "ANONTICKET_INTERNAL": "unix:/run/anonticket/internal.sock",
        "ANONTICKET_PUBLIC": "tcp:9999:interface=127.0.0.1",
        "ANONTICKET_NO_MONITOR": "yes",
        "ANONTICKET_ADMISSION_LIMIT": "7",
        "ANONTICKET_TOR_COOKIE_FILE": "/run/tor/control.authcookie",
    }
    config = parse([], env)
    assert config.admission_limit == 7
    assert config.tor_cookie_file == Path("/run/tor/control.authcookie")
    assert config.data_dir == Path("/srv/at")
    assert config.min_confirmations == 12 and config.min_amount == 2_000_000
    assert config.start_height == 77 and config.poll_interval == 10.0
    assert config.wallet_rpc == "http://127.0.0.1:28083"
    assert config.wallet_rpc_login == ("monitor", "s3cret")
    assert config.tor_control == "unix:/run/tor/control"
    assert config.internal == "unix:/run/anonticket/internal.sock:mode=600"  # owner-only
    assert config.public == "tcp:9999:interface=127.0.0.1"
    assert config.monitor is False
    config = parse(["--min-confirmations", "3", "--data-dir", "/x"], env)
    assert config.min_confirmations == 3 and config.data_dir == Path("/x")


def test_a_relative_tor_cookie_file_is_refused():
    with pytest.raises(ConfigError, match="--tor-cookie-file: expected an absolute path"):
        parse([*TCP, "--tor-cookie-file", "cookie"])


def test_empty_environment_values_count_as_unset():
    config = parse([*TCP, "--no-monitor"], {"ANONTICKET_MIN_CONFIRMATIONS": "  "})
    assert config.min_confirmations == 10


def test_every_setting_is_an_option_and_named_in_help():
    text = str(Options())
    for s in SETTINGS:
        assert f"--{s.name}" in text and s.env in text


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--min-confirmations", "abc"], {}, "--min-confirmations: expected a whole number"),
        (["--min-confirmations", "0"], {}, "--min-confirmations: must be between 1"),
        (["--min-amount", "-5"], {}, "--min-amount: must be between 1"),
        (["--poll-interval", "fast"], {}, "--poll-interval: expected seconds"),
        (["--poll-interval", "0"], {}, "--poll-interval: must be between"),
        (["--wallet-rpc", "ftp://x"], {}, "--wallet-rpc: expected http://"),
        (["--wallet-rpc", "http://u:p@127.0.0.1:1"], {}, "--wallet-rpc: put credentials"),
        (["--wallet-rpc-login", "nopassword"], {}, "--wallet-rpc-login: expected user:password"),
        (["--log-format", "xml"], {}, "--log-format: expected one of text, json, journal"),
        (["--database", "mysql://x"], {}, "--database: expected sqlite:///PATH"),
        (["--public", "ssl:443"], {}, "--public: unsupported endpoint type"),
        (["--tor-control", "tcp:192.0.2.1:9051"], {}, "--tor-control: expected unix:"),
        (["--public", "nonsense"], {}, "--public: expected an endpoint"),
        ([], {"ANONTICKET_NO_MONITOR": "maybe"}, "ANONTICKET_NO_MONITOR: expected 1/true"),
    ],
)
def test_bad_values_name_the_option(args, env, message):
    with pytest.raises(ConfigError) as e:
        parse([*TCP, *args], env)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_the_wallet_login_is_read_from_a_file_and_never_echoed(tmp_path):
    login = tmp_path / "login"
    login.write_text("monitor:s3cret\n")
    assert parse([*TCP, "--wallet-rpc-login-file", str(login)]).wallet_rpc_login == (
        "monitor",
        "s3cret",
    )
    env = {"ANONTICKET_WALLET_RPC_LOGIN_FILE": str(login)}
    assert parse(TCP, env).wallet_rpc_login == ("monitor", "s3cret")
    for bad in ("s3cret-without-user\n", "monitor:s3cret\nsecond:line\n", "x" * 5000):
        login.write_text(bad)
        with pytest.raises(ConfigError) as e:
            parse([*TCP, "--wallet-rpc-login-file", str(login)])
        assert str(e.value) == "--wallet-rpc-login-file: expected one line user:password"
    with pytest.raises(ConfigError) as e:
        parse([*TCP, "--wallet-rpc-login-file", str(tmp_path / "absent")])
    assert "--wallet-rpc-login-file: cannot read" in str(e.value)
    login.write_text("monitor:s3cret")
    with pytest.raises(ConfigError) as e:
        parse([*TCP, "--wallet-rpc-login", "a:b", "--wallet-rpc-login-file", str(login)])
    assert "give one, not both" in str(e.value) and "s3cret" not in str(e.value)


def test_every_bad_value_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        parse(["--min-confirmations", "x", "--min-amount", "y"])
    assert "--min-confirmations" in str(e.value) and "--min-amount" in str(e.value)


def test_the_default_public_endpoint_is_an_onion():
    config = parse(["--no-monitor"])
    assert config.public == "onion:80" and onion_port(config.public) == 80
    assert onion_port("tcp:8080:interface=127.0.0.1") is None


@pytest.mark.parametrize("public", ["onion:", "onion:http", "onion:0", "onion:80:controlPort=9051"])
def test_bad_onion_endpoints_are_refused(public):
    with pytest.raises(ConfigError, match="--public: expected onion:PORT"):
        parse(["--public", public])


@pytest.mark.parametrize(
    "control", ["unix:/run/tor/control", "tcp:127.0.0.1:9051", "tcp:host=127.0.0.1:port=9051"]
)
def test_local_tor_control_endpoints_are_accepted(control):
    assert parse(["--tor-control", control]).tor_control == control


@pytest.mark.parametrize(
    "control", ["tcp:10.0.0.5:9051", "tcp:tor.example:9051", "ssl:x:1", "9051"]
)
def test_remote_or_odd_tor_control_endpoints_are_refused(control):
    with pytest.raises(ConfigError, match="--tor-control"):
        parse(["--tor-control", control])


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp:9180:interface=127.0.0.1",
        "tcp:port=9180:interface=127.0.0.1",
        "tcp:9180:interface=127.3.4.5",
        "tcp6:9180:interface=\\:\\:1",
        "unix:/run/anonticket/internal.sock",
        "unix:/tmp/x.sock:mode=600",
    ],
)
def test_loopback_and_unix_internal_endpoints_are_accepted(endpoint):
    accepted = check_internal_endpoint(endpoint)
    # A unix socket is owner-only unless a mode is given (Twisted's default is 666).
    assert accepted == (
        endpoint + ":mode=600" if endpoint == "unix:/run/anonticket/internal.sock" else endpoint
    )


@pytest.mark.parametrize(
    ("option", "endpoint", "message"),
    [
        ("internal", "tcp:9180:interface=127.0.0.1:interface=0.0.0.0", "more than once"),
        ("internal", "tcp:9180:interface=0.0.0.0:interface=127.0.0.1", "more than once"),
        ("internal", "tcp:notaport:interface=127.0.0.1", "bad endpoint"),
        ("internal", "unix:/tmp/x.sock:mode=999", "bad endpoint"),
        ("public", "tcp:notaport", "bad endpoint"),
        ("public", "tcp:80:interface=127.0.0.1:interface=0.0.0.0", "more than once"),
        ("public", "tcp:80:bogus=1", "bad endpoint"),
        ("tor-control", "tcp:host=127.0.0.1:port=9051:host=10.0.0.1", "more than once"),
        ("tor-control", "tcp:host=10.0.0.1:port=9051", "a tor on this machine"),
        ("tor-control", "tcp:127.0.0.1:notaport", "bad endpoint"),
    ],
)
def test_endpoints_are_read_as_twisted_reads_them(option, endpoint, message):
    check = {
        "internal": check_internal_endpoint,
        "public": check_public_endpoint,
        "tor-control": check_tor_control,
    }[option]
    with pytest.raises(ConfigError, match=f"--{option}: .*{message}"):
        check(endpoint)


def test_keyword_forms_and_socket_modes():
    assert check_tor_control("tcp:port=9051:host=127.0.0.1") == "tcp:port=9051:host=127.0.0.1"
    assert check_tor_control("tcp:host=\\:\\:1:port=9051")
    assert check_public_endpoint("unix:/tmp/p.sock") == "unix:/tmp/p.sock:mode=600"
    assert check_public_endpoint("unix:/tmp/p.sock:mode=660") == "unix:/tmp/p.sock:mode=660"


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp:9180",
        "tcp:9180:interface=0.0.0.0",
        "tcp:9180:interface=10.0.0.1",
        "tcp:9180:interface=localhost",
        "tcp6:9180:interface=\\:\\:",
        "ssl:9180:interface=127.0.0.1",
        "onion:80",
    ],
)
def test_internal_endpoint_is_refused_unless_loopback_or_unix(endpoint):
    with pytest.raises(ConfigError, match="--internal"):
        check_internal_endpoint(endpoint)


@given(st.text(max_size=60))
def test_internal_check_never_raises_anything_but_config_error(text):
    try:
        accepted = check_internal_endpoint(text)
    except ConfigError as e:
        assert str(e).startswith("--internal: ")
    else:
        assert accepted in (text, text + ":mode=600")
        assert text.split(":", 1)[0].lower() in {"unix", "tcp", "tcp6", "ssl"}


def test_tor_config_takes_torrc_lines_and_refuses_what_anonticket_sets(tmp_path):
    torrc = tmp_path / "extra.torrc"
    torrc.write_text(
        "# bridges\nUseBridges 1\nBridge obfs4 192.0.2.1:443 X\nBridge obfs4 192.0.2.2:443 Y\n"
    )
    config = parse([*TCP, "--tor-config", str(torrc)])
    assert config.tor_config == {
        "UseBridges": "1",
        "Bridge": ["obfs4 192.0.2.1:443 X", "obfs4 192.0.2.2:443 Y"],
    }
    # tor reads option names in any case: each spelling would add a second listener or key.
    for line, name in (
        ("socksport 9050", "SocksPort"),
        ("SOCKSPort 9050", "SocksPort"),
        ("controlport 9051", "ControlPort"),
        ("DataDirectory /tmp/x", "DataDirectory"),
        ("cookieauthfile /tmp/c", "CookieAuthFile"),
    ):
        torrc.write_text(f"{line}\n")
        with pytest.raises(ConfigError, match=f"line 1: anonticket sets {name} itself"):
            parse([*TCP, "--tor-config", str(torrc)])
    torrc.write_text("NoValue\n")
    with pytest.raises(ConfigError, match="line 1: expected 'Option value'"):
        parse([*TCP, "--tor-config", str(torrc)])

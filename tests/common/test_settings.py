import argparse
import logging

import pytest

from dask_gateway_common.logs import LOG_FORMAT, redact, setup_logging
from dask_gateway_common.settings import (
    Problems,
    SettingsError,
    add_common_proxy_args,
    log_level,
    parse_host_port,
    read_token,
)


@pytest.mark.parametrize(
    "value, expected",
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        (":8786", ("0.0.0.0", 8786)),
        ("[::1]:0", ("::1", 0)),
        ("example.org:65535", ("example.org", 65535)),
        (" localhost:1 ", ("localhost", 1)),
    ],
)
def test_parse_host_port_ok(value, expected):
    assert parse_host_port(value, what="--address") == expected


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("", "empty"),
        ("localhost", "HOST:PORT"),
        ("localhost:", "port must be a number"),
        ("localhost:http", "port must be a number"),
        ("localhost:-1", "port must be a number"),
        ("localhost:65536", "out of range"),
        ("::1:80", "brackets"),
        ("[::1]80", "[IPV6]:PORT"),
        ("[]:80", "empty IPv6"),
        ("a b:80", "invalid host"),
        ("http://x:80", "not a URL"),
        ("x/y:80", "invalid host"),
        ("x:８０", "port must be a number"),
    ],
)
def test_parse_host_port_errors(value, fragment):
    with pytest.raises(ValueError, match="^--address: ") as info:
        parse_host_port(value, what="--address")
    assert fragment in str(info.value)


def test_read_token_from_env():
    assert read_token(token_file=None, env={"DASK_GATEWAY_PROXY_TOKEN": " abc\n"}) == "abc"
    assert read_token(env_var="T", token_file=None, env={"T": "xyz"}) == "xyz"
    with pytest.raises(ValueError, match="set DASK_GATEWAY_PROXY_TOKEN"):
        read_token(token_file=None, env={})
    with pytest.raises(ValueError, match="set T"):
        read_token(env_var="T", token_file=None, env={"T": "   "})


def test_read_token_file_wins(tmp_path):
    f = tmp_path / "token"
    f.write_text("from-file\n")
    env = {"DASK_GATEWAY_PROXY_TOKEN": "from-env"}
    assert read_token(token_file=str(f), env=env) == "from-file"


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "is empty"),
        (b" \n", "is empty"),
        (b"two words", "whitespace"),
        (b"\xff\xfe", "not UTF-8"),
        (b"x" * 70000, "too large"),
    ],
)
def test_read_token_file_errors_never_show_the_token(tmp_path, content, fragment):
    f = tmp_path / "token"
    f.write_bytes(content)
    with pytest.raises(ValueError) as info:
        read_token(token_file=str(f), env={})
    message = str(info.value)
    assert fragment in message and str(f) in message
    assert "words" not in message and "xxxx" not in message


def test_read_token_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read token file .*missing"):
        read_token(token_file=str(tmp_path / "missing"), env={"DASK_GATEWAY_PROXY_TOKEN": "x"})


def test_read_token_env_error_hides_value():
    with pytest.raises(ValueError) as info:
        read_token(token_file=None, env={"DASK_GATEWAY_PROXY_TOKEN": "sec ret"})
    assert "environment variable DASK_GATEWAY_PROXY_TOKEN" in str(info.value)
    assert "sec" not in str(info.value).replace("DASK", "")


def test_log_level():
    assert log_level("debug") == "DEBUG"
    assert log_level(" Warning ") == "WARNING"
    with pytest.raises(ValueError, match="one of DEBUG, INFO"):
        log_level("verbose")


def test_problems_collects_everything():
    problems = Problems()
    assert not problems
    problems.raise_if_any()  # nothing yet
    assert problems.capture(parse_host_port, "127.0.0.1:80", what="--address") == (
        "127.0.0.1",
        80,
    )
    assert problems.capture(parse_host_port, "nope", what="--admin-address") is None
    assert problems.capture(read_token, token_file=None, env={}) is None
    assert problems.check(1 + 1 == 2, "arithmetic") is True
    assert problems.check("", "--api-url is required") is False
    with pytest.raises(SettingsError) as info:
        problems.raise_if_any()
    err = info.value
    assert len(err.problems) == 3
    lines = str(err).splitlines()
    assert lines[0].startswith("--admin-address: ")
    assert lines[1].startswith("no token")
    assert lines[2] == "--api-url is required"


def test_problems_capture_lets_other_errors_through():
    def boom():
        raise KeyError("bug")

    with pytest.raises(KeyError):
        Problems().capture(boom)


def test_add_common_proxy_args():
    parser = argparse.ArgumentParser()
    add_common_proxy_args(parser)
    args = parser.parse_args(
        ["--address", ":8786", "--api-url", "http://127.0.0.1:8000/api/v1/routes"]
    )
    assert args.address == ":8786"
    assert args.api_url == "http://127.0.0.1:8000/api/v1/routes"
    assert args.admin_address == "127.0.0.1:0"
    assert args.api_token_file is None
    assert args.log_level == "INFO"
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, action.dest
    args = parser.parse_args(
        [
            "--address=a:1",
            "--api-url=u",
            "--admin-address=:9",
            "--api-token-file=/t",
            "--log-level=debug",
        ]
    )
    assert (args.admin_address, args.api_token_file, args.log_level) == (":9", "/t", "debug")


def test_setup_logging_is_idempotent(capsys):
    name = "dask_gateway.test_settings"
    setup_logging("debug", name=name)
    setup_logging("INFO", name=name)
    logger = logging.getLogger(name)
    assert len(logger.handlers) == 1
    assert logger.level == logging.INFO
    assert logger.handlers[0].formatter._fmt == LOG_FORMAT
    with pytest.raises(ValueError):
        setup_logging("loud", name=name)
    logger.removeHandler(logger.handlers[0])


def test_setup_logging_writes_to_stderr(capsys):
    name = "dask_gateway.test_settings_stderr"
    setup_logging("INFO", name=name)  # handler bound to the captured stderr
    logger = logging.getLogger(name)
    try:
        logger.info("hello %s", "world")
        logger.debug("hidden")
        err = capsys.readouterr().err
        assert "I dask_gateway.test_settings_stderr] hello world" in err
        assert "hidden" not in err
    finally:
        logger.removeHandler(logger.handlers[0])


def test_redact():
    assert redact("token=abc&x=abcdef", "abc", "abcdef") == "token=[redacted]&x=[redacted]"
    assert redact("nothing here", "", None) == "nothing here"
    assert redact("k=s3", b"s3") == "k=[redacted]"

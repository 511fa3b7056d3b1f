"""`ansimi gateway run --config`: a bad file stops start-up naming the file, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from gw_testkit import CENTRAL_TOML as CENTRAL

from ansimi.config import ConfigError, load_config
from ansimi_edge.cli import cli
from gateway.config import GatewayConfig, SuperviseConfig
from protocol.keys import generate_key, save_private_key


def run(config: Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["gateway", "run", "--config", str(config)])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[intake]\nwindow_s = 0\n", "key `intake.window_s`"),
        ("[supervise]\nmissed = 0\n", "key `supervise.missed`"),
        ("[api]\nport = 70000\n", "key `api.port`"),
        ("[api]\nenabled = true\n", "no [[api.tokens]]: add at least one"),
        ('[[api.tokens]]\nname = "central"\n', "set exactly one of token and token_file"),
        ('[[api.tokens]]\nname = "central"\ntoken = "short"\n', "key `api.tokens.0.token`"),
        ("[mqtt]\nportt = 1\n", "key `mqtt.portt`: Extra inputs are not permitted"),
        ('[api]\ncert_file = "/x.crt"\n', "set both api.cert_file and api.key_file"),
        ("[api\n", "not valid TOML"),
    ],
)
def test_a_bad_value_stops_the_cli_with_file_key_and_fix(
    tmp_path: Path, text: str, expected: str
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(text)
    code, output = run(config)
    assert code == 1
    assert str(config) in output
    assert expected in output
    assert "Fix:" in output
    assert "Traceback" not in output


def test_a_missing_file_or_key_is_named(tmp_path: Path) -> None:
    code, output = run(tmp_path / "absent.toml")
    assert code == 1 and "absent.toml: file not found. Fix: create it" in output
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'signing_key = "{tmp_path}/nokey"\ndatabase = "{tmp_path}/gw.db"\n' + CENTRAL
    )
    code, output = run(config)
    assert code == 1
    assert f"no key at {tmp_path}/nokey" in output and "ansimi provision init-site" in output


def test_a_bad_key_file_or_database_path_is_named(tmp_path: Path) -> None:
    key = tmp_path / "signing.key"
    key.write_text("not a key")
    config = tmp_path / "gateway.toml"
    config.write_text(f'signing_key = "{key}"\ndatabase = "{tmp_path}/gw.db"\n' + CENTRAL)
    code, output = run(config)
    assert code == 1 and f"key file {key}" in output and "Traceback" not in output
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config.write_text(f'database = "{blocker}/gw.db"\n' + CENTRAL)
    code, output = run(config)
    assert code == 1 and "cannot open the database" in output and "Fix:" in output


def test_an_api_certificate_that_cannot_be_loaded_stops_the_cli(tmp_path: Path) -> None:
    key = tmp_path / "signing.key"
    save_private_key(key, generate_key())
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'signing_key = "{key}"\ndatabase = "{tmp_path}/gw.db"\n[api]\nenabled = true\n'
        f'cert_file = "{tmp_path}/api.crt"\nkey_file = "{tmp_path}/api.key"\n'
        '[[api.tokens]]\nname = "central"\ntoken = "a-long-enough-token"\n' + CENTRAL
    )
    code, output = run(config)
    assert code == 1 and "api.cert_file" in output and "Fix:" in output
    assert "Traceback" not in output


def test_tokens_come_from_a_file_and_a_missing_one_is_named(tmp_path: Path) -> None:
    secret = tmp_path / "central.token"
    secret.write_text("a-long-random-token-from-a-file\n")
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[api]\nenabled = true\n[[api.tokens]]\nname = "central"\ntoken_file = "{secret}"\n'
        + CENTRAL
    )
    loaded = load_config(config, GatewayConfig)
    assert loaded.api.tokens[0].secret == "a-long-random-token-from-a-file"
    assert "a-long-random" not in repr(loaded)  # secrets stay out of logs
    secret.unlink()
    with pytest.raises(ConfigError, match=r"cannot read token_file .*central.token"):
        load_config(config, GatewayConfig)
    secret.write_text("short")
    with pytest.raises(ConfigError, match="fewer than 16 characters"):
        load_config(config, GatewayConfig)


def test_the_inline_token_is_not_in_the_repr() -> None:
    config = GatewayConfig.model_validate(
        {
            "api": {"tokens": [{"name": "central", "token": "inline-secret-0123456789"}]},
            "centres": [{"name": "central", "url": "https://127.0.0.1/", "secret": "s" * 16}],
        }
    )
    assert "inline-secret" not in repr(config)
    assert config.supervise.timeout_ms == 30_000


@pytest.mark.parametrize(
    ("centres", "unrouted"),
    [
        ("", "none serves any district"),
        (
            '[[centres]]\nname = "mapo"\nurl = "https://127.0.0.1/"\nsecret = "%s"\n'
            'districts = ["mapo"]\n' % ("s" * 16),
            "none serves jongno, jung, yongsan",
        ),
        (
            '[[sia]]\nname = "monitoring"\nport = 12128\naccount = "1234"\n'
            'districts = ["gangnam"]\n',
            "none serves jongno",
        ),
    ],
)
def test_a_district_without_a_destination_stops_the_start(
    tmp_path: Path, centres: str, unrouted: str
) -> None:
    """An alert from there would be acked `received` and wait for nobody (issue 14.7)."""
    key = tmp_path / "signing.key"
    save_private_key(key, generate_key())
    config = tmp_path / "gateway.toml"
    config.write_text(f'signing_key = "{key}"\ndatabase = "{tmp_path}/gw.db"\n' + centres)
    code, output = run(config)
    assert code == 1 and str(config) in output and "Traceback" not in output
    assert "[[centres]]" in output and unrouted in output
    assert 'Fix: add the central centre ([[centres]] with districts = ["*"]' in output
    assert not (tmp_path / "gw.db").exists()  # refused before anything was opened


def test_the_will_grace_stays_short_of_the_silence_timeout() -> None:
    assert SuperviseConfig(heartbeat_s=10, missed=3, will_grace_s=10).will_grace_ms == 10_000
    assert SuperviseConfig(heartbeat_s=1, missed=3, will_grace_s=10).will_grace_ms == 1_500


def test_a_growing_outage_is_updated_at_least_twice_a_heartbeat() -> None:
    rule = SuperviseConfig(heartbeat_s=1, outage_update_s=5).outage_rule()
    assert rule is not None and rule.update_ms == 500
    assert SuperviseConfig(group_outages=False).outage_rule() is None


def test_heartbeats_wait_at_most_half_the_silence_timeout_less_one_heartbeat() -> None:
    """The store's last-seen lags by the flush interval: it must stay well inside the time
    another instance's supervisor gives a device before it finds it silent."""

    def flush_ms(flush_s: float, heartbeat_s: float, missed: int) -> int:
        return GatewayConfig.model_validate(
            {
                "intake": {"heartbeat_flush_s": flush_s},
                "supervise": {"heartbeat_s": heartbeat_s, "missed": missed},
                "centres": [
                    {"name": "central", "url": "https://127.0.0.1/events", "secret": "s" * 24}
                ],
            }
        ).heartbeat_flush_ms

    assert flush_ms(1.0, 10, 3) == 1_000
    assert flush_ms(1.0, 1, 2) == 500
    assert flush_ms(5.0, 1, 3) == 1_000
    assert flush_ms(1.0, 10, 1) == 0  # no room: each heartbeat kept as it arrives

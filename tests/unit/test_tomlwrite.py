"""The one TOML writer: every value escaped, and what it writes reads back the same."""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path

import pytest

from ansimi.tomlwrite import TomlWriteError, render_toml
from gateway.config import GatewayConfig
from siteca.site import SiteInfo, SiteLayout, gateway_toml

AWKWARD = 'C:\\sites\\"north" \u00e4 \n tab\t'


def test_strings_and_paths_that_break_an_f_string_read_back_the_same() -> None:
    document = {
        "id": AWKWARD,
        "path": Path('/srv/it\'s "here"'),
        "mqtt": {"port": 8883, "ratio": 0.5, "on": True, "unset": None},
        "api": {"tokens": [{"name": "a", "token": AWKWARD}]},
        "centres": [{"name": "c", "districts": ["*"]}, {"name": "d", "districts": []}],
    }
    text = render_toml(document, header=["made by a test"], comments={"mqtt": "the broker"})
    read = tomllib.loads(text)
    assert read["id"] == AWKWARD and read["path"] == '/srv/it\'s "here"'
    assert read["api"]["tokens"][0]["token"] == AWKWARD
    assert [c["name"] for c in read["centres"]] == ["c", "d"]
    assert "# unset (unset)" in text and "unset" not in read["mqtt"]
    assert text.startswith("# made by a test\n") and "# the broker\n[mqtt]" in text


def test_a_value_toml_cannot_hold_is_refused() -> None:
    with pytest.raises(TomlWriteError, match="set"):
        render_toml({"a": {1, 2}})


def test_a_site_in_a_folder_with_a_quote_gets_a_gateway_config_that_loads(
    tmp_path: Path,
) -> None:
    # the site's gateway.toml was an f-string: a quote in the path made it unreadable
    site = SiteLayout(tmp_path / 'site "north"')
    info = SiteInfo(name="north", gateway_id="gw-north", created_at=dt.datetime.now(dt.UTC))
    text = gateway_toml(site, info, "https://127.0.0.1:8080/alerts", 'a-long-se"cret\\-for-tests')
    config = tomllib.loads(text)
    assert config["enrol"]["site_dir"] == str(site.root)
    assert config["centres"][0]["secret"] == 'a-long-se"cret\\-for-tests'
    # the API's tokens are named by file, read when the config loads
    site.tokens_dir.mkdir(parents=True)
    for token in config["api"]["tokens"]:
        Path(token["token_file"]).write_text("a-token-of-sixteen-or-more")
    GatewayConfig.model_validate(config)

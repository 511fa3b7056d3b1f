"""Example config files parse, mention every option, and config errors say file, key and fix."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from ansimi.config import ConfigError, load_config
from device.config import DeviceConfig
from gateway.config import GatewayConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [
    (ROOT / "gateway" / "gateway.example.toml", GatewayConfig),
    (ROOT / "device" / "device.example.toml", DeviceConfig),
]


def option_names(model: type[BaseModel]) -> set[str]:
    names: set[str] = set()
    for name, field in model.model_fields.items():
        sub = field.annotation
        if typing.get_origin(sub) is list:
            (sub,) = typing.get_args(sub)
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            names |= option_names(sub)
        else:
            names.add(name)
    return names


@pytest.mark.parametrize(("path", "model"), EXAMPLES, ids=lambda v: getattr(v, "name", ""))
def test_example_file_parses_and_mentions_every_option(path: Path, model: type[BaseModel]) -> None:
    load_config(path, model)
    text = path.read_text()
    written = set(re.findall(r"^#? ?([a-z0-9_]+) =", text, flags=re.MULTILINE))
    missing = option_names(model) - written
    assert not missing, f"{path.name} does not mention: {sorted(missing)}"


def test_bad_value_names_file_key_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("[forward]\ntimeout_s = -1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, GatewayConfig)
    message = str(caught.value)
    assert str(path) in message
    assert "`forward.timeout_s`" in message
    assert "Fix:" in message


def test_unknown_key_is_refused_with_spelling_hint(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('idd = "gw-1"\n')
    with pytest.raises(ConfigError, match=r"key `idd`.*did you mean `id`\?"):
        load_config(path, GatewayConfig)
    path.write_text("[video]\nnothing_like_it = 1\n")
    with pytest.raises(ConfigError, match=r"`video.nothing_like_it`.*check its spelling"):
        load_config(path, GatewayConfig)


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "device.toml"
    path.write_text("[device\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, DeviceConfig)
    with pytest.raises(ConfigError, match=r"file not found\. Fix: create it"):
        load_config(tmp_path / "absent.toml", DeviceConfig)

"""Issue 19: a typo in device.toml or gateway.toml stops the service at start with the file,
the key and the fix, the key it was probably meant to be included.

The files are the ones an installer has: the example device.toml, and the gateway.toml
`ansimi provision init-site` wrote, each with one mistake made by hand; the services run as
the installer runs them (`python -m ansimi_edge ...`).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ansimi.broker import free_port
from siteca.site import init_site

EXAMPLE_DEVICE = Path(__file__).resolve().parents[2] / "device" / "device.example.toml"


def start(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ansimi_edge", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def with_mistake(source: Path, target: Path, line: str, mistake: str) -> Path:
    text = source.read_text()
    assert re.search(line, text, re.MULTILINE), line
    target.write_text(re.sub(line, mistake, text, count=1, flags=re.MULTILINE))
    return target


def names_file_key_and_fix(stderr: str, config: Path, key: str, fix: str) -> None:
    assert stderr.startswith(f"Error: {config}: "), stderr
    (line,) = [line for line in stderr.splitlines() if key in line]
    assert fix in line, stderr
    assert "Traceback" not in stderr


@pytest.fixture
def gateway_toml(tmp_path: Path) -> Path:
    init_site(tmp_path / "site", listen_host="127.0.0.1", port=free_port(), api_port=free_port())
    return tmp_path / "site" / "gateway" / "gateway.toml"


@pytest.mark.parametrize(
    ("line", "mistake", "says"),
    [
        (r"^discreet_led = ", "discret_led = ", "key `device.discret_led`"),
        (r"^heartbeat_s = .*$", 'heartbeat_s = "ten"', "key `mqtt.heartbeat_s`"),
    ],
    ids=["unknown key", "wrong type"],
)
@pytest.mark.parametrize("command", ["run", "selftest"])
def test_a_device_toml_mistake_names_file_key_and_fix(
    tmp_path: Path, command: str, line: str, mistake: str, says: str
) -> None:
    config = with_mistake(EXAMPLE_DEVICE, tmp_path / "device.toml", line, mistake)
    done = start("device", command, "--config", str(config))
    assert done.returncode == 1, done.stdout + done.stderr
    fix = "did you mean `discreet_led`?" if "discret" in mistake else "got 'ten'; change it"
    names_file_key_and_fix(done.stderr, config, says, fix)


@pytest.mark.parametrize(
    ("line", "mistake", "says", "fix"),
    [
        (r"^port = ", "prot = ", "key `mqtt.prot`", "did you mean `port`?"),
        (r"^\[api\]$", "[apii]", "key `apii`", "did you mean `api`?"),
        (r"^url = ", "urll = ", "key `centres.0.urll`", "did you mean `url`?"),
        (r"^enabled = true$", "enabled = 1.5", "key `api.enabled`", "got 1.5; change it"),
    ],
    ids=["unknown key", "unknown table", "unknown key in a centre", "wrong type"],
)
def test_a_gateway_toml_mistake_names_file_key_and_fix(
    tmp_path: Path, gateway_toml: Path, line: str, mistake: str, says: str, fix: str
) -> None:
    config = with_mistake(gateway_toml, gateway_toml, line, mistake)
    done = start("gateway", "run", "--config", str(config))
    assert done.returncode == 1, done.stdout + done.stderr
    names_file_key_and_fix(done.stderr, config, says, fix)

"""`ansimi provision release ...`: the release key, a signed bundle, and a bad one refused
before it leaves the installer's machine."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from click.testing import CliRunner
from release_kit import make_wheel

from ansimi.bundle import read_bundle
from ansimi_edge.cli import cli
from protocol.keys import public_key_from_b64


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["provision", *args])
    return result.exit_code, result.output


def test_a_release_key_then_a_bundle_it_signs(tmp_path: Path) -> None:
    site = tmp_path / "site"
    code, out = _run("release", "key", "init", "--dir", str(site), "--json")
    assert code == 0, out
    made = json.loads(out)
    key_file = Path(made["key_file"])
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # a second init would leave every device pinning a key nobody signs with: refused
    code, out = _run("release", "key", "init", "--dir", str(site))
    assert code == 1 and "--force" in out
    wheel = make_wheel(tmp_path, "1.4.0")
    bundle = tmp_path / "ansimi-1.4.0.bundle"
    args = ["--dir", str(site), "--version", "1.4.0", "--min-version", "1.2", "--out", str(bundle)]
    code, out = _run("release", "build", *args, str(wheel))
    assert code == 0, out
    manifest = read_bundle(bundle, public_key_from_b64(made["public_key"])).manifest
    assert (manifest.version, manifest.min_version) == ("1.4.0", "1.2")


def test_a_bundle_signed_by_another_site_is_refused_before_upload(tmp_path: Path) -> None:
    for name in ("ours", "theirs"):
        assert _run("release", "key", "init", "--dir", str(tmp_path / name))[0] == 0
    bundle = tmp_path / "theirs.bundle"
    wheel = make_wheel(tmp_path, "1.4.0")
    theirs = ["--dir", str(tmp_path / "theirs"), "--version", "1.4.0", "--min-version", "1.0"]
    assert _run("release", "build", *theirs, "--out", str(bundle), str(wheel))[0] == 0
    # the gateway is never asked: nothing listens there
    code, out = _run(
        "release", "add", str(bundle), "--dir", str(tmp_path / "ours"),
        "--gateway", "http://127.0.0.1:9", "--admin-token-file", str(wheel),
    )  # fmt: skip
    assert code == 1, out
    assert "does not verify" in out

"""Release bundles: built, signed, and refused for each way one can be wrong."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from release_kit import make_bundle, make_wheel, release_signer

from ansimi.bundle import MANIFEST_NAME, extract_wheels, read_bundle
from protocol.release import Manifest, ReleaseRefused, check_replaces, sign_manifest


def _rewrite(bundle: Path, change: dict[str, bytes | None], add: dict[str, bytes] | None = None):
    """Copy the tar with members replaced (bytes) or dropped (None), and members added."""
    members: list[tuple[str, bytes]] = []
    with tarfile.open(bundle) as tar:
        for member in tar:
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if member.name in change:
                replaced = change[member.name]
                if replaced is None:
                    continue
                data = replaced
            members.append((member.name, data))
    members += list((add or {}).items())
    with tarfile.open(bundle, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_bundle_reads_back_with_its_manifest_and_wheels(tmp_path: Path) -> None:
    signer = release_signer()
    bundle = make_bundle(tmp_path, signer, "1.2.0", min_version="1.0")
    verified = read_bundle(bundle, signer.public_key)
    assert verified.manifest.version == "1.2.0"
    assert verified.manifest.min_version == "1.0"
    out = tmp_path / "out"
    out.mkdir()
    wheels = extract_wheels(verified, out)
    assert [w.name for w in wheels] == list(verified.manifest.files)
    original = tmp_path / "wheels-1.2.0" / wheels[0].name
    assert wheels[0].read_bytes() == original.read_bytes()


def test_a_tampered_wheel_is_refused(tmp_path: Path) -> None:
    signer = release_signer()
    bundle = make_bundle(tmp_path, signer, "1.2.0")
    name = next(iter(read_bundle(bundle, signer.public_key).manifest.files))
    _rewrite(bundle, {name: make_wheel(tmp_path, "6.6.6").read_bytes()})
    with pytest.raises(ReleaseRefused) as caught:
        read_bundle(bundle, signer.public_key)
    assert caught.value.reason == "hash_mismatch"


def test_a_bundle_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, release_signer(), "1.2.0")
    with pytest.raises(ReleaseRefused) as caught:
        read_bundle(bundle, release_signer().public_key)
    assert caught.value.reason == "bad_signature"


def test_a_manifest_rewritten_to_match_a_new_wheel_fails_its_signature(tmp_path: Path) -> None:
    signer = release_signer()
    bundle = make_bundle(tmp_path, signer, "1.2.0")
    token = read_bundle(bundle, signer.public_key).manifest_token
    header, _, signature = token.split(".")
    forged = Manifest(version="9.9", min_version="0.1", files={"x.whl": "0" * 64}, created_ms=1)
    payload = sign_manifest(forged, release_signer()).split(".")[1]
    _rewrite(bundle, {MANIFEST_NAME: f"{header}.{payload}.{signature}".encode()})
    with pytest.raises(ReleaseRefused) as caught:
        read_bundle(bundle, signer.public_key)
    assert caught.value.reason == "bad_signature"


@pytest.mark.parametrize(
    ("change", "add", "reason"),
    [
        ({}, {"evil.whl": b"payload"}, "extra_file"),
        ({}, {"../escape.whl": b"payload"}, "malformed"),
        ({MANIFEST_NAME: None}, {}, "malformed"),
        ("drop-wheel", {}, "missing_file"),
    ],
    ids=["extra", "path", "no-manifest", "missing"],
)
def test_a_bundle_whose_members_differ_from_the_manifest_is_refused(
    tmp_path: Path, change: dict[str, bytes | None] | str, add: dict[str, bytes], reason: str
) -> None:
    signer = release_signer()
    bundle = make_bundle(tmp_path, signer, "1.2.0")
    if change == "drop-wheel":
        change = dict.fromkeys(read_bundle(bundle, signer.public_key).manifest.files)
    assert isinstance(change, dict)
    _rewrite(bundle, change, add)
    with pytest.raises(ReleaseRefused) as caught:
        read_bundle(bundle, signer.public_key)
    assert caught.value.reason == reason


def test_a_release_may_replace_only_versions_from_its_minimum_and_only_older(
    tmp_path: Path,
) -> None:
    signer = release_signer()
    manifest = read_bundle(
        make_bundle(tmp_path, signer, "2.10.0", min_version="2.2"), signer.public_key
    ).manifest
    check_replaces(manifest, "2.9.1")  # 2.9 < 2.10 as numbers, though not as text
    for installed, reason in [("2.1.9", "too_old"), ("2.10.0", "not_newer"), ("3.0", "not_newer")]:
        with pytest.raises(ReleaseRefused) as caught:
            check_replaces(manifest, installed)
        assert caught.value.reason == reason, installed

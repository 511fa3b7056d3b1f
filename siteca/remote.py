"""The command line that enrols a device over ssh: the installer's CLI (`ansimi provision
device rotate --ssh`) and the device's own (`ansimi device enrol --ssh`) both run it, so it
lives below both."""

from __future__ import annotations

import shlex
from pathlib import Path


def ssh_command(
    target: str,
    gateway: str,
    *,
    config_out: Path,
    state_dir: Path,
    with_ca: bool,
    force: bool,
    remote_ansimi: str = "ansimi",
    ssh: str = "ssh",
) -> list[str]:
    """The ssh command line that runs `ansimi device enrol` on the device; the token (and
    the CA) go on stdin: `--token -`, `--ca-file -`."""
    remote = [
        remote_ansimi,
        "device",
        # the command's first spelling, which it still answers to (a hidden alias): a device
        # whose software predates the rename enrols too
        "enroll",
        "--gateway",
        gateway,
        "--token",
        "-",
        "--config-out",
        str(config_out),
        "--state-dir",
        str(state_dir),
    ]
    if with_ca:
        remote += ["--ca-file", "-"]
    if force:
        remote.append("--force")
    # ssh joins its arguments with spaces for the remote shell: quote them as one
    return [ssh, "-o", "BatchMode=yes", "-T", target, "--", shlex.join(remote)]

"""The README's installer section, run as written: from init-site to an acknowledged press.

The commands come from the README's fenced block after `<!-- installer-test -->`; if the
README changes, this follows it. Substituted, and only these: the system paths (into a
temporary folder), the ports (free ones), `.venv/bin/ansimi` (this venv's), `TOKEN` (the
one `device add` printed), and `--listen 127.0.0.1` added to init-site (tests use loopback
only). Each line runs in bash; a line ending in `&` is a service, waited for until it
answers. The operator's acknowledgement is made the way the README says: POST
/alerts/{id}/acknowledged with the central operator's token.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ansimi.broker import free_port, mosquitto_path

README = Path(__file__).resolve().parents[2] / "README.md"
MARK = "<!-- installer-test -->"
ANSIMI = str(Path(sys.executable).with_name("ansimi"))
STEP_TIMEOUT_S = 60.0

pytestmark = pytest.mark.slow


def readme_commands(text: str) -> list[str]:
    """The command lines of the fenced block after MARK, comments and blanks left out."""
    after = text.split(MARK, 1)[1]
    block = after.split("```sh\n", 1)[1].split("\n```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def wait_for(what: str, ready: Callable[[], bool], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}")
        if ready():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not come up within {STEP_TIMEOUT_S:g} s")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def api(
    base: str, path: str, token: str, context: ssl.SSLContext, method: str = "GET"
) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        base + path, method=method, headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except OSError:
        return 0, {}


@pytest.fixture
def root() -> Iterator[Path]:
    # not pytest's tmp_path: a broker started as root drops to user mosquitto, which must be
    # able to walk to the site's broker files (the site makes them its own)
    made = Path(tempfile.mkdtemp(prefix="ansimi-readme-"))
    made.chmod(0o755)
    try:
        yield made
    finally:
        subprocess.run(["rm", "-rf", str(made)], check=False)


def test_the_readme_installer_section_gets_to_an_acknowledged_press(root: Path) -> None:
    if mosquitto_path() is None:
        pytest.fail("mosquitto is not installed: `apt-get install -y mosquitto`")
    ports = {"8883": free_port(), "8480": free_port(), "8080": free_port()}
    site = root / "etc" / "ansimi" / "site"
    api_base = f"https://127.0.0.1:{ports['8480']}"

    def substitute(line: str, token: str) -> str:
        line = line.replace(".venv/bin/ansimi", ANSIMI)
        line = line.replace("/etc/ansimi", str(root / "etc" / "ansimi"))
        line = line.replace("/var/lib/ansimi", str(root / "var" / "lib" / "ansimi"))
        for port, free in ports.items():
            line = re.sub(rf"(?<=[ :]){port}\b", str(free), line)
        line = line.replace(" TOKEN ", f" {token} ")
        if "provision init-site" in line:
            line += " --listen 127.0.0.1"
        return line

    (root / "etc" / "ansimi").mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    services: list[subprocess.Popen[bytes]] = []
    token = "TOKEN"
    press: subprocess.Popen[str] | None = None
    try:
        for raw in readme_commands(README.read_text()):
            line = substitute(raw, token)
            if line.endswith("&"):
                proc = subprocess.Popen(
                    ["bash", "-c", line.removesuffix("&").strip()],
                    env=env,
                    cwd=root,
                    start_new_session=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                services.append(proc)
                if raw.startswith("mosquitto"):
                    wait_for("the broker", lambda: port_open(ports["8883"]), proc)
                elif "gateway run" in raw:
                    trust = ssl.create_default_context(cafile=str(site / "ca" / "ca.crt"))
                    wait_for(
                        "the gateway's API",
                        lambda trust=trust: api(api_base, "/healthz", "-", trust)[0] == 200,
                        proc,
                    )
                elif "console" in raw:
                    wait_for("the console", lambda: port_open(ports["8080"]), proc)
                elif "device run" in raw:
                    sock = root / "var" / "lib" / "ansimi" / "device" / "control.sock"
                    wait_for("the agent's control socket", sock.exists, proc)
                continue
            if "device press" in raw:
                press = subprocess.Popen(
                    ["bash", "-c", line], env=env, cwd=root, text=True,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                )  # fmt: skip
                break
            done = subprocess.run(
                ["bash", "-c", line],
                env=env,
                cwd=root,
                capture_output=True,
                text=True,
                timeout=STEP_TIMEOUT_S,
                check=False,
            )
            assert done.returncode == 0, f"{raw}\n{done.stdout}\n{done.stderr}"
            if "device add" in raw:
                found = re.search(r"^\s+(\S+\.\S+)\s*$", done.stdout, re.MULTILINE)
                assert found, done.stdout
                token = found.group(1)
        assert press is not None, "the README's block has no `device press`"

        # the operator acknowledges the alert with the central operator's token
        context = ssl.create_default_context(cafile=str(site / "ca" / "ca.crt"))
        operator = (site / "gateway" / "tokens" / "central.token").read_text().strip()
        deadline = time.monotonic() + STEP_TIMEOUT_S
        acked = False
        while not acked and time.monotonic() < deadline and press.poll() is None:
            status, body = api(api_base, "/alerts", operator, context)
            alerts = body.get("alerts", []) if status == 200 else []
            for alert in alerts:  # type: ignore[attr-defined]
                path = f"/alerts/{alert['event_id']}/acknowledged"
                acked = api(api_base, path, operator, context, "POST")[0] == 200 or acked
            time.sleep(0.3)
        out, err = press.communicate(timeout=STEP_TIMEOUT_S)
        assert press.returncode == 0, out + err
        stages = [m.group(1) for m in re.finditer(r"\s(received|delivered|acknowledged)\s", out)]
        assert stages[-1] == "acknowledged" and "delivered" in stages, out
    finally:
        if press is not None and press.poll() is None:
            press.kill()
            press.communicate()
        for proc in reversed(services):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

"""`ansimi console add-operator` and the console's start-up checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from ansimi_edge.cli import cli
from console.operators import Operators

# unset, whatever the environment running the tests holds
NO_PASSWORD: dict[str, str | None] = {"ANSIMI_OPERATOR_PASSWORD": None}


def test_add_operator_from_the_environment(tmp_path: Path) -> None:
    db = tmp_path / "console.db"
    result = CliRunner().invoke(
        cli,
        ["console", "add-operator", "kim", "--db", str(db)],
        env={"ANSIMI_OPERATOR_PASSWORD": "a long password"},
    )
    assert result.exit_code == 0, result.output
    assert Operators(db).check_password("kim", "a long password")
    # the password is nowhere in what was printed
    assert "a long password" not in result.output


def test_add_operator_from_a_prompt_and_refusals(tmp_path: Path) -> None:
    db = tmp_path / "console.db"
    runner = CliRunner()
    args = ["console", "add-operator", "lee", "--db", str(db)]
    result = runner.invoke(cli, args, input="password one\npassword one\n", env=NO_PASSWORD)
    assert result.exit_code == 0, result.output
    assert Operators(db).check_password("lee", "password one")
    again = runner.invoke(cli, args, input="password two\npassword two\n", env=NO_PASSWORD)
    assert again.exit_code != 0 and "exists already" in again.output
    short = runner.invoke(
        cli,
        ["console", "add-operator", "park", "--db", str(db)],
        input="short\nshort\n",
        env=NO_PASSWORD,
    )
    assert short.exit_code != 0 and "at least 10" in short.output


@pytest.mark.parametrize(
    ("env", "extra", "message"),
    [
        ({"ANSIMI_CENTRE_SECRET": None}, [], "ANSIMI_CENTRE_SECRET"),
        (
            {"ANSIMI_CENTRE_SECRET": "s" * 20, "ANSIMI_CONSOLE_GATEWAY_TOKEN": None},
            ["--gateway", "http://127.0.0.1:1"],
            "ANSIMI_CONSOLE_GATEWAY_TOKEN",
        ),
        (
            {"ANSIMI_CENTRE_SECRET": "s" * 20},
            ["--gateway-key", "gw-1"],
            "GATEWAY_ID=BASE64_PUBLIC_KEY",
        ),
        (
            {"ANSIMI_CENTRE_SECRET": "s" * 20},
            ["--tile-url", "tiles.example.org/z/x/y.png"],
            "--tile-url",
        ),
    ],
)
def test_start_up_says_what_is_missing(
    tmp_path: Path, env: dict[str, str | None], extra: list[str], message: str
) -> None:
    result = CliRunner().invoke(cli, ["console", "--db", str(tmp_path / "c.db"), *extra], env=env)
    assert result.exit_code != 0
    assert message in result.output


def test_the_page_may_load_tiles_from_the_configured_server_only() -> None:
    from console.web import content_policy

    assert "img-src 'self' data:;" in content_policy("")
    policy = content_policy("https://{s}.tiles.example.org/{z}/{x}/{y}.png")
    assert "img-src 'self' data: https://*.tiles.example.org;" in policy
    assert "https://tiles.city.example:8443;" in content_policy(
        "https://tiles.city.example:8443/{z}/{x}/{y}.png"
    )

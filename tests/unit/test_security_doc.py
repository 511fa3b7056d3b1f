"""docs/security.md names a test for every line of the threat model: each must exist, and
no row may be left "unknown"."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"


def cited_tests() -> list[tuple[str, str]]:
    """(file under tests/, test name) for every citation; `::name` reuses the last file."""
    cited = []
    last_file = ""
    for file, name in re.findall(
        r"`((?:unit|integration|adversarial|e2e)/[\w/]+\.py)?::(\w+)`", DOC.read_text()
    ):
        last_file = file or last_file
        cited.append((last_file, name))
    return cited


def test_every_cited_test_exists() -> None:
    cited = cited_tests()
    assert len(cited) >= 20
    for file, name in cited:
        source = (ROOT / "tests" / file).read_text()
        assert re.search(rf"^(async )?def {name}\(", source, re.M), f"{file}::{name} is gone"


def test_every_row_names_a_test_and_none_is_unknown() -> None:
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| ")][2:]
    for row in rows:
        assert "unknown" not in row.lower(), row
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert "::test_" in cells[-1] or cells[-1] == "same test, its last step", row

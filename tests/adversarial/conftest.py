"""One attacked site per test module (see adv_kit.py): building it is the slow part."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from adv_kit import Site, attacked_site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with attacked_site(tmp_path_factory.mktemp("site")) as built:
        yield built

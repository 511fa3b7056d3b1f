"""A real site and a real mosquitto with its TLS, ACL and CRL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prov_broker_kit import Identities

from ansimi.broker import Mosquitto, free_port, mosquitto_path
from siteca.broker_conf import current_user
from siteca.site import Site, init_site


@pytest.fixture
def site(tmp_path: Path) -> Site:
    init_site(tmp_path / "site", site="test", listen_host="127.0.0.1", port=free_port())
    return Site.open(tmp_path / "site")


@pytest.fixture
def broker(site: Site, tmp_path: Path) -> Iterator[Mosquitto]:
    """The site's broker, run as the current user (root stays root rather than dropping to
    `mosquitto`, which could not enter pytest's private tmp_path)."""
    if mosquitto_path() is None:
        pytest.fail("mosquitto is not installed: `apt-get install -y mosquitto`")
    server = Mosquitto(site.broker_config(state_dir=tmp_path / "state", run_as=current_user()))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ids(site: Site, tmp_path: Path) -> Identities:
    return Identities(site, tmp_path / "identities")

"""`provision doctor` against the site's real mosquitto: mutual TLS and a CONNACK."""

from __future__ import annotations

from ansimi.broker import Mosquitto
from provisioning.doctor import check_site
from siteca.site import Site


def test_the_sites_broker_passes_with_the_gateways_identity(site: Site, broker: Mosquitto) -> None:
    (check,) = [
        c for c in check_site(site.layout.root, timeout_s=3.0) if c.name.startswith("broker")
    ]
    assert check.ok, check.detail
    broker.stop()
    (check,) = [
        c for c in check_site(site.layout.root, timeout_s=3.0) if c.name.startswith("broker")
    ]
    assert not check.ok and "mosquitto -c" in check.detail

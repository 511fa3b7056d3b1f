"""One root error per package, and no click exception below the CLI edge.

Every public exception a package defines derives from that package's root, so a caller can
catch one package's errors alone; none is a `click.ClickException`, which would tie the
domain to one way of presenting it (the commands convert at their edge).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import click
import pytest

from ansimi.errors import AnsimiError
from console.errors import ConsoleError
from device.errors import DeviceError
from gateway.errors import GatewayError
from protocol.errors import ProtocolError
from simulator.errors import SimulatorError
from siteca.errors import ProvisioningError

ROOTS: dict[str, type[Exception]] = {
    "protocol": ProtocolError,
    "ansimi": AnsimiError,
    "siteca": ProvisioningError,
    "device": DeviceError,
    "gateway": GatewayError,
    # the installer's CLI shares the root of the site library it is built on
    "provisioning": ProvisioningError,
    "simulator": SimulatorError,
    "console": ConsoleError,
}


def public_errors(package: str) -> list[type[BaseException]]:
    root = importlib.import_module(package)
    names = [package, *(m.name for m in pkgutil.walk_packages(root.__path__, package + "."))]
    errors: list[type[BaseException]] = []
    for name in names:
        if name.rsplit(".", 1)[-1] == "__main__":
            continue
        module = importlib.import_module(name)
        errors += [
            value
            for attribute, value in vars(module).items()
            if inspect.isclass(value)
            and issubclass(value, BaseException)
            and value.__module__ == name
            and not attribute.startswith("_")
        ]
    return errors


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_every_error_of_a_package_derives_from_its_root(package: str) -> None:
    errors = public_errors(package)
    assert errors, f"{package} defines no error: is the walk broken?"
    strays = [e.__qualname__ for e in errors if not issubclass(e, ROOTS[package])]
    assert strays == [], f"{package}: errors outside {ROOTS[package].__name__}"


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_no_domain_error_is_a_click_exception(package: str) -> None:
    clicky = [e.__qualname__ for e in public_errors(package) if issubclass(e, click.ClickException)]
    assert clicky == []

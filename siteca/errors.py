"""What provisioning refuses, as exceptions an installer can act on.

Each class also inherits the builtin a caller would naturally catch, so code that knows
nothing of this package still handles them sensibly. Messages say what failed, where, and
what to do next.
"""

from __future__ import annotations


class ProvisioningError(Exception):
    """Root of every error this package raises on purpose."""


class InvalidName(ProvisioningError, ValueError):
    """A site name, device id or host name that cannot be used."""


class PemError(ProvisioningError, ValueError):
    """A file or text that should hold a PEM key, certificate or CSR does not."""


class CsrRejected(ProvisioningError, ValueError):
    """A certificate signing request the CA will not sign."""


class SiteExists(ProvisioningError, FileExistsError):
    """The target already holds a site (or something else) and --force was not given."""


class SiteNotFound(ProvisioningError, FileNotFoundError):
    """No site at the given directory, or an incomplete one."""


class UnknownCertificate(ProvisioningError, LookupError):
    """A serial number or common name that this site's CA never issued."""


class BrokerControlError(ProvisioningError, RuntimeError):
    """The broker could not be reloaded, or a live client could not be disconnected."""

"""The site library: a site directory, its CA, the broker files it renders and the errors it
raises. Below `gateway` and `provisioning`, which both use it (the gateway signs device
CSRs with the site CA; the installer's CLI makes and manages sites), so neither imports
the other."""

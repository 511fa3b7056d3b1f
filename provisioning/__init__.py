"""The installer's CLI: site CA, device identities, config bundles, broker ACLs."""

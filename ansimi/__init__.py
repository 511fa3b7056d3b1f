"""Shared plumbing: the `ansimi` command, the asyncio MQTT session, config, systemd notify."""

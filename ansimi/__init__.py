"""Shared plumbing: the asyncio MQTT session, config, broker files, districts, systemd notify."""

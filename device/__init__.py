"""The device agent: behaviour, MQTT link, durable outbox, video and config."""

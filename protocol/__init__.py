"""The wire contract: signed envelopes (JWS, EdDSA), typed messages, topics, replay rules. No I/O."""

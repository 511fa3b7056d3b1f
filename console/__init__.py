"""A reference control-centre receiver: live alerts page, acks, live video."""

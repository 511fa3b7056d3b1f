"""Fleets of real agents on fake hardware, scenarios, fault injection, reports."""

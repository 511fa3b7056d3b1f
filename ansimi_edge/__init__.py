"""Composition: the `ansimi` command and the demo, on top of every other package."""

"""The gateway's video hub: device streams in, recordings sealed, live viewers out (WHEP).

`config` is light (no aiortc import); `hub`, `recorder`, `evidence` and `whep` are
imported where video runs.
"""

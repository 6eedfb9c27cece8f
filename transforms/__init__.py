"""Beam transforms: each does one thing. Models live in ``models/``; this package only moves records."""

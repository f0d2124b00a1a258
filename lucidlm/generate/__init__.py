"""Decoding. ``reference.py`` holds the plain recompute-everything loop that faster engines are
checked against."""

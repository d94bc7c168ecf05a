"""Simulator: virtual terminals that run the real firmware code, with visitor traffic."""

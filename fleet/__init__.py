"""Palaute fleet service: registry, ingest, reports and the ``palaute`` command."""

__version__ = "0.1.0"

"""Content versions: rendering texts to 1-bit screens, packaging and signing them (issue 7)."""

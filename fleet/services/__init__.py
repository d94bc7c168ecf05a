"""Domain logic.  Routes and the ingest worker call these; they own no transport."""

"""MQTT ingest: votes into the database, health into InfluxDB, presence into the registry."""

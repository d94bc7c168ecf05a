"""Real services for tests: Mosquitto, PostgreSQL, VictoriaMetrics and MicroPython.

Each is started by a fixture on a free port in a temporary directory and stopped afterwards.
When ``CI`` is set a missing service fails the test instead of skipping it.
"""

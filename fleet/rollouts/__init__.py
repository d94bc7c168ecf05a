"""Rollouts: one content version sent to devices in waves, tracked per device (issue 7)."""

"""Palaute terminal firmware.

Plain MicroPython that also runs under CPython (simulator, tests).  Only ``board_esp32`` may
import ``machine``, ``network``, ``esp32`` or ``ntptime``; everything else receives hardware as
arguments.
"""

FW_VERSION = "0.1.0"

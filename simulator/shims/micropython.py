"""CPython stand-in for MicroPython's ``micropython`` module.

The firmware uses ``from micropython import const`` so private constants cost no RAM on the
device.  Under CPython (simulator, unit tests) ``const`` is the identity function.
"""


def const(value: int) -> int:
    """Return ``value`` unchanged; on MicroPython this inlines the constant at compile time."""
    return value

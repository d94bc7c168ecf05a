"""Run one firmware unit-test module under MicroPython and report each test.

Usage: micropython tests/firmware/mp_runner.py MODULE [TEST_NAME]

Prints one line per test, ``PASS name`` or ``FAIL name`` followed by the traceback, and a
final ``SUMMARY passed=N failed=M``.  Exits 1 if any test failed.  Coroutine tests are run
with ``asyncio.run`` so the same module also runs under pytest (CPython), where tests call
``asyncio.run`` themselves.
"""

import gc
import sys


def main():
    name = sys.argv[1]
    only = sys.argv[2] if len(sys.argv) > 2 else None
    module = __import__(name)
    passed = failed = 0
    for attr in sorted(dir(module)):
        if not attr.startswith("test_") or (only and attr != only):
            continue
        fn = getattr(module, attr)
        if not callable(fn):
            continue
        gc.collect()
        try:
            fn()
            passed += 1
            print("PASS", attr)
        except Exception as exc:  # report every failure, keep running the others
            failed += 1
            print("FAIL", attr)
            sys.print_exception(exc, sys.stdout)
    print("SUMMARY passed=%d failed=%d" % (passed, failed))
    sys.exit(1 if failed or not passed else 0)


main()

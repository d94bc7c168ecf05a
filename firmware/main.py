"""Device entry point (``/main.py``): boot the terminal; see ``terminal/boot.py``.

Config and pin-map problems never get here: ``Boot`` keeps the terminal in safe mode.  Anything
else that escapes is logged (console and ``/crash.log``) and the chip is reset after a delay,
as the last resort.  Ctrl-C (``KeyboardInterrupt``, used by provisioning tools) is not an
``Exception`` and drops to the REPL instead.
"""

import time

RESET_DELAY_S = 10  # long enough to interrupt with Ctrl-C before the reset


def main():
    import asyncio

    from terminal.app import Terminal
    from terminal.board_esp32 import Esp32Board
    from terminal.boot import Boot

    asyncio.run(Boot(Esp32Board, Terminal).run())


try:
    main()
except Exception as exc:  # the last resort: log, wait, reset
    try:
        from terminal.boot import log_crash

        log_crash(exc)
    except Exception:
        print("palaute: fatal:", repr(exc))
    time.sleep(RESET_DELAY_S)
    from terminal.board_esp32 import hard_reset

    hard_reset()

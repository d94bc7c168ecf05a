"""Power cuts for firmware tests: SIGKILL a MicroPython process at a chosen point.

SIGKILL stops the process between any two instructions, like a power cut stops the CPU; the
data the process handed to the kernel survives, as a committed littlefs file does on the
device.
"""

from __future__ import annotations

import signal
import subprocess


def run_and_kill(cmd: list[str], env: dict[str, str], lines_before_kill: int) -> list[str]:
    """Start ``cmd``, SIGKILL it after reading ``lines_before_kill`` lines; all its lines.

    Lines printed before the kill landed are read to EOF: they were acknowledged too.  A
    line cut by the kill has no newline and is dropped.
    """
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    try:
        while len(lines) < lines_before_kill:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        proc.send_signal(signal.SIGKILL)
        lines.extend(proc.stdout.readlines())
        err = proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"{cmd[-2:]} died on its own: {err}"
    return [line.rstrip("\n") for line in lines if line.endswith("\n")]

"""Gather the MicroPython stub distributions into one clean directory for mypy.

micropython-esp32-stubs and micropython-stdlib-stubs install .pyi files straight into
site-packages, next to CPython packages that must not be type-checked as MicroPython code.
This links only their files into DEST, which then serves as both MYPYPATH and typeshed.
"""

import sys
from importlib.metadata import distribution
from pathlib import Path


def main() -> None:
    """Link the stub files of both distributions into the directory given as argv[1]."""
    dest = Path(sys.argv[1])
    for name in ("micropython-esp32-stubs", "micropython-stdlib-stubs"):
        dist = distribution(name)
        for file in dist.files or []:
            if file.parts[0].endswith((".dist-info", "..")) or file.suffix not in (".pyi", ""):
                continue
            source = Path(str(dist.locate_file(file)))
            target = dest / Path(*file.parts)
            if source.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(source)


if __name__ == "__main__":
    main()

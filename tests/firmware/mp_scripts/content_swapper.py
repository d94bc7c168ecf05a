"""Replace content over and over until killed; run by tests/firmware/test_content_power_cut.py.

Usage: micropython content_swapper.py ROOT   (MICROPYPATH: firmware/ and tests/firmware/unit)

Boots the store as the terminal does (a stale ``content.tmp`` is deleted, ``content.bin``
loaded) and prints ``B version stale_tmp boot_error``.  Then, forever: writes the next
version to ``content.tmp`` in 512-byte pieces as a download does (``W version offset``
after each), commits it with the atomic rename and prints ``A version``.
"""

import sys

from _support import simple_package
from terminal.content import ContentStore


def main():
    store = ContentStore(sys.argv[1], 128, 64)
    store.boot()
    print("B", store.version, int(store.stale_tmp), store.boot_error)
    version = store.version
    while True:
        version = version % 60000 + 1
        package = simple_package(version, languages=("fi", "sv", "en")[:1 + version % 3])
        with open(store.tmp_path, "wb") as f:
            for offset in range(0, len(package), 512):
                f.write(package[offset:offset + 512])
                print("W", version, offset)
        store.commit()
        print("A", version)


main()

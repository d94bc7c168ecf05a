"""Content on the terminal: the verified package on flash and how it is replaced.

The store keeps one file, ``content.bin``, replaced only by renaming a verified
``content.tmp`` over it (atomic on the device's filesystem), so a power cut leaves the old or
the new package.  Screens are read from flash into one preallocated buffer when shown: the
package never sits in RAM whole.  The package format and its checks are in
``terminal.package``, loaded only while a package is checked (``load``).
"""

import os
import sys

VERSION_MAX = 0xFFFF
BIN = "content.bin"
TMP = "content.tmp"


class PackageError(ValueError):
    """A package the terminal refuses; ``reason`` is the reported reason."""

    def __init__(self, reason, detail):
        super().__init__("%s: %s" % (reason, detail))
        self.reason = reason


class Content:
    """A verified package on flash: its header and where its bitmap area starts."""

    def __init__(self, path, version, header, bitmap_at):
        self.path = path
        self.version = version
        self.header = header
        self.bitmap_at = bitmap_at
        self.languages = header["languages"]
        self.show = header["show"]
        self.rotate_s = header.get("rotate_s", 8)
        self.settings = header.get("settings", {})
        self.hours = header.get("hours")

    def read_screen(self, kind, lang, buf):
        """Read screen ``kind`` (question/thanks) in ``lang`` into ``buf`` (one screen)."""
        with open(self.path, "rb") as f:
            f.seek(self.bitmap_at + self.header["screens"][kind][lang])
            if f.readinto(buf) != len(buf):
                raise OSError("short read")


def load(path, width, height):
    """Parse and bounds-check the package at ``path``; return a ``Content``.

    Raises PackageError for a malformed package and OSError when the file cannot be read.
    The parser is loaded for this call only (it runs at boot and once per update).
    """
    from terminal import package

    try:
        return package.load(path, width, height)
    finally:
        unload("terminal.package")


def _remove(path):
    try:
        os.remove(path)
        return True
    except OSError:
        return False  # absent


class ContentStore:
    """``content.bin`` in directory ``root`` for a ``width`` x ``height`` display."""

    def __init__(self, root, width, height):
        self.root = root
        self.width = width
        self.height = height
        self.bin_path = root + "/" + BIN
        self.tmp_path = root + "/" + TMP
        self.current = None  # the Content shown, or None for the built-in question
        self.boot_error = None  # why content.bin could not be used at boot, if it could not

    @property
    def version(self):
        """The version shown (0: the built-in default question)."""
        return self.current.version if self.current is not None else 0

    def boot(self):
        """Delete a stale ``content.tmp`` and load ``content.bin`` if there is one.

        A download cut short by a reset is never resumed; it is fetched again.  An
        unreadable ``content.bin`` leaves the built-in question and sets ``boot_error``.
        """
        self.stale_tmp = _remove(self.tmp_path)
        try:
            os.stat(self.bin_path)
        except OSError:
            return None
        try:
            self.current = load(self.bin_path, self.width, self.height)
        except PackageError as exc:
            self.boot_error = str(exc)
        except OSError as exc:
            self.boot_error = "storage_error: %s" % exc
        return self.current

    def commit(self, version=None):
        """Make the verified ``content.tmp`` current: one atomic rename over content.bin.

        ``version`` is the one the signature and the downgrade check were made for: a package
        whose own header says otherwise is refused (``bad_package``) before the rename, so
        the version shown is always the version that was signed.
        """
        content = load(self.tmp_path, self.width, self.height)
        if version is not None and content.version != version:
            raise PackageError("bad_package", "package says version %d, desired was %d"
                               % (content.version, version))
        os.rename(self.tmp_path, self.bin_path)
        content.path = self.bin_path
        self.current = content
        self.boot_error = None
        return content

    def discard(self):
        """Delete a partial or refused ``content.tmp``."""
        _remove(self.tmp_path)


def unload(name):
    """Forget module ``name`` (``terminal.x``) so its code can be garbage-collected: for the
    parts of the firmware that run rarely (package checks, downloads, the verifier)."""
    sys.modules.pop(name, None)
    package = sys.modules.get("terminal")
    leaf = name.rsplit(".", 1)[-1]
    if package is not None and leaf in getattr(package, "__dict__", {}):
        delattr(package, leaf)

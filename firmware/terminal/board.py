"""What every board shares: reporting events and the storage directories.

``SimBoard`` and ``Esp32Board`` derive from ``Board``; a subclass sets ``root`` (the
filesystem prefix of its storage) and ``on_event`` (or leaves it None).
"""

import os


class Board:
    """Base of the board classes: ``emit`` and ``storage``."""

    root = ""
    on_event = None

    def emit(self, name, data=None):
        """Report an observable change to ``on_event``; False when there is none."""
        if self.on_event:
            self.on_event(name, data)
            return True
        return False

    def storage(self, name):
        """A directory for ``name`` on the flash filesystem (created if missing)."""
        path = self.root + "/" + name
        try:
            os.mkdir(path)
        except OSError:
            pass  # exists already
        return path

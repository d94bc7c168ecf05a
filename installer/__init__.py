"""The installer: put the terminal firmware and a device's config onto a board over USB serial.

``installer.raw_repl`` talks to MicroPython's raw REPL (run code, copy files, read the chip's
unique id).  ``installer.flash`` writes MicroPython onto the board with esptool
(``flash_image``: which chip an image is for; ``flash_output``: the progress bar).  Errors are
:class:`installer.raw_repl.InstallerError` subclasses whose message is one line an installer
can act on.
"""

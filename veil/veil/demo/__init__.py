"""``veil demo``: an encrypted round trip end to end, and the untrusted host's view of it.

* :mod:`~veil.demo.cli` — the command.
* :mod:`~veil.demo.relay` — a loopback TCP relay that records every byte (also used by the tests).
"""

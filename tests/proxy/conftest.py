"""The proxy tests reuse the SDK tests' in-process enclave (``tests/client/fake_enclave.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

CLIENT_TESTS = str(Path(__file__).resolve().parent.parent / "client")
if CLIENT_TESTS not in sys.path:
    sys.path.insert(0, CLIENT_TESTS)

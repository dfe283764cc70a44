"""Rewrite the golden files. Only run this for a deliberate, versioned change of the wire format."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_protocol import GOLDEN_DIR, join, sample_messages

import protocol

for name, msg in sample_messages().items():
    (GOLDEN_DIR / f"{name}.bin").write_bytes(join(protocol.encode(msg)))
    print("wrote", name)

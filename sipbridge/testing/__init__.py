"""The local-call harness: one bridged call on this machine (``localcall``), the SIP leg read back from its capture
(``capture``), lip sync from marks in the media (``lipsync``) and the demo built on them (``demo``).

Used by ``sipbridge demo``, the tests and the benchmarks. Nothing else in ``sipbridge`` imports it (a test checks):
the CLI loads it only inside the demo command, so the shipped commands never pull it in.
"""

from sipbridge.testing.localcall import CallOptions, LocalCall

__all__ = ["CallOptions", "LocalCall"]

"""sipbridge: bridge a WebRTC room and SIP through a pipeline of ZeroMQ stages."""

__version__ = "0.1.0"

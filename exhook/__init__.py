"""offline-exhook: offline messages for EMQX through its ExHook gRPC protocol."""

__version__ = "0.1.0"

"""Serving many adapters on one base: the ASGI app, the mixed-adapter batcher, the server (``loratune serve``)."""

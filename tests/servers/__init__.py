"""Servers for the tests: real ones in subprocesses, and the loops servers run.

- ``process``: start uvicorn in a subprocess, put concurrent HTTP load on it, stop it.
- ``fastapi_app``: the FastAPI application it serves, configured by environment variables.
- ``worker_loop``: one reused thread or greenlet serving many requests, as a worker does (imported
  by a gevent/eventlet scenario once it has monkey-patched).
"""

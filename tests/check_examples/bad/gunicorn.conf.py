"""gunicorn settings: the application is imported once, in the master, then workers fork."""

bind = "0.0.0.0:8000"
workers = 4
worker_class = "gevent"
preload_app = True

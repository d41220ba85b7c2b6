"""Command line of the scenario script, parsed once on import; standard library only.

The scenario parses its arguments *before* it decides whether to monkey-patch, and ``--patch
before`` must patch before anything imports ``threading``, ``socket`` or SQLAlchemy, so this module
imports nothing that would (``argparse`` doesn't).
"""

from __future__ import annotations

import argparse

_parser = argparse.ArgumentParser(
    description="greenlet requests through one scoped session registry"
)
_parser.add_argument("--framework", choices=("gevent", "eventlet"), required=True)
_parser.add_argument(
    "--workload",
    choices=("race", "kill"),
    required=True,
    help="race: 30 requests, one fails; kill: greenlets killed between add and commit",
)
_parser.add_argument(
    "--registry",
    choices=("sqlalchemy", "sessionscope"),
    required=True,
    help="sqlalchemy.orm.scoped_session or sessionscope.scoped_session",
)
_parser.add_argument(
    "--patch",
    choices=("before", "after", "never"),
    required=True,
    help="monkey-patch before importing SQLAlchemy, after creating the registry, or never",
)
_parser.add_argument("--url", required=True, help="SQLAlchemy database URL")

args = _parser.parse_args()

"""Command line of the scenario scripts; standard library only.

A scenario parses its arguments *before* it decides whether to monkey-patch, and ``--patch before``
must patch before anything imports ``threading``, ``socket`` or SQLAlchemy, so this module imports
nothing that would (``argparse`` doesn't).
"""

from __future__ import annotations

import argparse


def parse_args(description: str, patch_modes: tuple[str, ...]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--registry",
        choices=("sqlalchemy", "sessionscope"),
        required=True,
        help="sqlalchemy.orm.scoped_session or sessionscope.scoped_session",
    )
    parser.add_argument(
        "--patch",
        choices=patch_modes,
        required=True,
        help="monkey-patch before importing SQLAlchemy, after creating the registry, or never",
    )
    parser.add_argument("--url", required=True, help="SQLAlchemy database URL")
    return parser.parse_args()

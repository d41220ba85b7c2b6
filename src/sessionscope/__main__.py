"""``python -m sessionscope <command>``; the only command so far is ``demo``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "demo":
        print(
            "usage: python -m sessionscope demo [--url URL] [--units N] [--rows N] "
            "[--models threads,gevent,asyncio,web]\n"
            "                                   [--web-requests N] [--web-clients N] [--json]\n"
            "       python -m sessionscope demo --help",
            file=sys.stderr,
        )
        return 2
    from .demo import main as demo_main  # imports SQLAlchemy's ORM: only when asked to

    return demo_main(args[1:])


if __name__ == "__main__":
    sys.exit(main())

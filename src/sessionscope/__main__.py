"""``python -m sessionscope <command>``: ``demo`` (the races sessionscope prevents), ``check`` (a
static check of an application's sources), ``audit`` (run a program with its sessions guarded);
``--version``.
Each command's module is imported only when asked for."""

from __future__ import annotations

import importlib
import sys

# command -> module whose ``main(argv) -> int`` runs it (imported lazily: ``demo`` loads the ORM)
COMMANDS = {
    "demo": "sessionscope.demo",
    "check": "sessionscope._check",
    "audit": "sessionscope._audit._command",
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--version"]:
        from . import __version__

        print(f"sessionscope {__version__}")
        return 0
    if not args or args[0] not in COMMANDS:
        print(
            "usage: python -m sessionscope demo [--url URL] [--units N] [--rows N] "
            "[--models threads,gevent,asyncio,web]\n"
            "                                   [--web-requests N] [--web-clients N] [--json]\n"
            "       python -m sessionscope demo --help\n"
            "       python -m sessionscope check PATH... [--format text|json] "
            "[--select CODES] [--ignore CODES]\n"
            "       python -m sessionscope audit [--mode warn|raise] [--json FILE] [--exit-zero] "
            "-- COMMAND [ARGS...]\n"
            "       python -m sessionscope --version",
            file=sys.stderr,
        )
        return 2
    command_main = importlib.import_module(COMMANDS[args[0]]).main
    return int(command_main(args[1:]))


if __name__ == "__main__":
    sys.exit(main())

"""``# noqa`` comments, read as ruff reads them.

``# noqa`` alone silences every finding on its line; ``# noqa: SS104`` (several codes separated by
commas or spaces) only those codes. Only real comments count, found with ``tokenize``: the text
``# noqa`` inside a string does not silence anything.
"""

from __future__ import annotations

import io
import re
import tokenize

_NOQA = re.compile(
    r"#\s*noqa(?::\s?(?P<codes>[A-Z]+[0-9]+(?:[,\s]+[A-Z]+[0-9]+)*))?", re.IGNORECASE
)

#: line -> the codes silenced there (None: all of them)
Suppressions = dict[int, "frozenset[str] | None"]


def suppressions(source: str) -> Suppressions:
    found: Suppressions = {}
    if "noqa" not in source.lower():  # tokenizing is the slow part: skip it when pointless
        return found
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):  # the parser reports the source as broken
        return found
    for token in tokens:
        if token.type != tokenize.COMMENT:
            continue
        match = _NOQA.search(token.string)
        if match is None:
            continue
        codes = match.group("codes")
        line = token.start[0]
        if codes is None:
            found[line] = None
        elif found.get(line, frozenset()) is not None:
            parsed = frozenset(code.upper() for code in re.split(r"[,\s]+", codes) if code)
            found[line] = (found.get(line) or frozenset()) | parsed
    return found


def silenced(found: Suppressions, line: int, code: str) -> bool:
    if line not in found:
        return False
    codes = found[line]
    return codes is None or code in codes

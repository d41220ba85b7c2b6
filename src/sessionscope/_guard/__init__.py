"""The share-nothing guard: a session and its objects are used by their owning unit only.

- ``_ownership``: who owns a session, who is inside it, the checks and their messages;
- ``_lineage``: which units inherited the owner's context (legitimate borrowers);
- ``_guarded_class``: the checked variant of a Session class that guarded sessions switch to;
- ``_writes``: the checks on writes to mapped attributes of attached objects;
- ``_install``: ``guard()`` and what registries and scopes call for their sessions;
- ``_handoff``: ``hand_off()`` / ``adopt()``; ``_shared``: ``SharedSession``.
"""

from __future__ import annotations

from ._handoff import adopt, hand_off
from ._install import born_guarded, check_mode, guard, guard_of, install
from ._lineage import cleanup
from ._ownership import Mode
from ._shared import SharedSession

__all__ = [
    "Mode",
    "SharedSession",
    "adopt",
    "born_guarded",
    "check_mode",
    "cleanup",
    "guard",
    "guard_of",
    "hand_off",
    "install",
]

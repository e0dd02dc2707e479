"""Keras' LayoutMap lookups, with the matching key remembered per path.

Keras' ``LayoutMap[path]`` tries ``re.fullmatch`` of every key against the path when the
path is not a key itself, and a layer call under a distribution looks up its output's layout
(``"<layer path>/output"``) on every call: a 3-block transformer step makes 37 such
lookups against its map's 9 keys (333 regular-expression matches; a keras-hub model's map has more).
Here each map remembers, per path, which key matched (or that none did), as long as its keys
are the same ones (a key added or removed starts it afresh). The layout returned is always
the map's current value for that key, and a path several keys match raises Keras' own error
on every lookup. Results equal Keras' lookup.
"""

from __future__ import annotations

import functools
import re

__all__ = ["wrap_getitem"]

_NO_MATCH = object()


def wrap_getitem(original):
    """LayoutMap.__getitem__, remembering the key each path matched (module docstring)."""

    @functools.wraps(original)
    def __getitem__(self, key):
        layouts = self._layout_map
        if key in layouts:
            return layouts[key]
        keys = tuple(layouts)
        memo = self.__dict__.get("_shardimpl_matches")
        if memo is None or memo[0] != keys:
            memo = (keys, {})
            self.__dict__["_shardimpl_matches"] = memo
        match = memo[1].get(key)
        if match is None:
            matching = [pattern for pattern in keys if re.fullmatch(pattern, key)]
            if len(matching) > 1:
                return original(self, key)  # Keras' own error, naming the keys
            match = memo[1][key] = matching[0] if matching else _NO_MATCH
        return None if match is _NO_MATCH else layouts[match]

    return __getitem__

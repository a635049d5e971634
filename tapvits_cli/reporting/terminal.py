"""Text for a terminal: what an artifact says is shown, never executed by the terminal.

Kept apart from the inspection views (and their NumPy import) because every error line
and log line goes through it.
"""

from __future__ import annotations

import re

# C0 and C1 control characters but tab and newline, DEL, the bidirectional marks, overrides and isolates,
# and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str, one_line: bool = False) -> str:
    """``text`` with its control characters written as escapes (``\\x1b``, ``\\u202e``), for a terminal.

    Strings from artifacts (class names, architectures, lineage names, dataset references)
    reach terminals in tables, logs and error lines: an ESC in one could set the window
    title, clear the screen or write the clipboard (OSC 52), a bidirectional override could
    reorder what is shown. ``one_line`` escapes newlines too (an error is one line).
    """
    escaped = _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), text)
    return escaped.replace("\n", "\\n") if one_line else escaped

"""Per-frame action sequences: a compact text syntax, parsing and formatting.

Action-conditioned rollouts need one action id per generated frame.  Typing
hundreds of ids is impractical, so the command line takes a run-length spec
such as ``"right:16,up:8,none:4"`` that repeats cyclically to the requested
length, or a path to a file holding the same syntax or a JSON list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

# Index == action id.  The toy world owns the vocabulary (its dynamics and
# trained checkpoints depend on the order); re-exported here for convenience.
from streamkd.data.toyworld import ACTIONS

__all__ = ["ACTIONS", "ActionSpecError", "format_action_spec", "parse_action_spec"]

_EXAMPLE = "right:16,up:8,none:4"
_ALLOWED = (
    f"allowed: {', '.join(ACTIONS)} (or ids 0-{len(ACTIONS) - 1}); "
    f"example: {_EXAMPLE!r}"
)


class ActionSpecError(ValueError):
    """An action spec (string or file) cannot be turned into action ids."""


def _fail(source: str, problem: str) -> ActionSpecError:
    # One line on purpose: these surface as CLI errors next to a flag name.
    return ActionSpecError(f"bad action spec {source}: {problem}; {_ALLOWED}")


def _is_uint(text: str) -> bool:
    # isascii() guards against Unicode digits such as "²" that int() rejects;
    # isdigit() already rejects "-1", "1.5", "+3" and "".
    return text.isascii() and text.isdigit()


def _action_id(name: str, source: str, where: str) -> int:
    key = name.strip().lower()
    if key in ACTIONS:
        return ACTIONS.index(key)
    if _is_uint(key) and int(key) < len(ACTIONS):
        return int(key)
    hint = ""
    if os.sep in name or name.endswith((".txt", ".json")):
        hint = " (if this was meant as a file path, no such file exists)"
    raise _fail(source, f"unknown action {name.strip()!r} at {where}{hint}")


def _parse_segment(token: str, source: str, where: str) -> tuple[int, int]:
    """Parse ``name`` or ``name:count`` into ``(action_id, count)``."""
    name, sep, count_text = token.partition(":")
    action = _action_id(name, source, where)
    if not sep:
        return action, 1
    count_text = count_text.strip()
    if not _is_uint(count_text) or int(count_text) < 1:
        raise _fail(
            source,
            f"count {count_text!r} in {token.strip()!r} at {where} is not a positive integer",
        )
    return action, int(count_text)


def _compact_segments(text: str) -> Iterator[tuple[str, str]]:
    """Yield ``(token, position)`` for each non-empty segment of compact syntax.

    Lines and commas both separate segments and ``#`` starts a comment, so a
    file can hold one segment per line with annotations.  Positions are
    reported as line/segment numbers so errors point at the offending token.
    """
    lines = text.splitlines()
    for line_no, line in enumerate(lines, start=1):
        # Empty segments (trailing commas, blank lines) are skipped but still
        # counted, so reported positions match what the user sees.
        for seg_no, segment in enumerate(line.split("#", 1)[0].split(","), start=1):
            if not segment.strip():
                continue
            where = f"segment {seg_no}" if len(lines) == 1 else f"line {line_no}, segment {seg_no}"
            yield segment, where


def _json_segments(text: str, source: str) -> Iterator[tuple[str, str]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise _fail(source, f"invalid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from err
    if not isinstance(items, list):
        raise _fail(source, f"JSON must be a list of action names or ids, got {type(items).__name__}")
    for index, item in enumerate(items):
        # bool is an int subclass; true/false in a JSON file is surely a mistake.
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise _fail(source, f"JSON item {index} is {item!r}, expected an action name or id")
        yield str(item), f"JSON item {index}"


def parse_action_spec(spec: str, num_frames: int) -> list[int]:
    """Expand an action spec into exactly ``num_frames`` action ids.

    ``spec`` is either compact syntax (``"right:16,up:8,none:4"``; a bare name
    counts once) or the path of an existing file holding compact syntax
    (commas or newlines, ``#`` comments) or a JSON list of names/ids.  The
    resulting pattern repeats cyclically and is truncated to ``num_frames``.

    Raises:
        ActionSpecError: on any malformed spec, with the offending token and
            its position, the allowed names and an example.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ActionSpecError(f"num_frames must be a positive integer, got {num_frames!r}")
    if not spec.strip():
        raise _fail(repr(spec), "the spec is empty")

    # os.path.isfile (unlike Path.is_file) swallows "name too long" and NUL
    # errors, which long or odd compact specs would otherwise trigger.
    if os.path.isfile(spec):
        path = Path(spec)
        source = f"file {str(path)!r}"
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise _fail(source, f"not UTF-8 text (byte {err.start})") from err
        # A .json suffix or a leading bracket means JSON; routing "{...}" there
        # too gives "must be a list" instead of a baffling unknown-name error.
        if path.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
            segments = _json_segments(text, source)
        else:
            segments = _compact_segments(text)
    else:
        # The offending token is quoted on its own, so a long spec is
        # shortened here to keep the one-line error readable.
        source = repr(spec) if len(spec) <= 60 else repr(spec[:57] + "...")
        segments = _compact_segments(spec)

    pattern: list[int] = []
    for token, where in segments:
        action, count = _parse_segment(token, source, where)
        # Runs past num_frames can never be reached, so cap them: a typo like
        # "right:99999999999" must not allocate a huge list.  Later segments
        # are still parsed so every error is reported.
        pattern.extend([action] * min(count, num_frames - len(pattern)))
    if not pattern:
        raise _fail(source, "it contains no actions")

    repeats = -(-num_frames // len(pattern))  # ceiling division
    return (pattern * repeats)[:num_frames]


def format_action_spec(ids: Iterable[int]) -> str:
    """Run-length encode action ids into compact syntax (inverse of parsing).

    ``parse_action_spec(format_action_spec(ids), len(ids)) == list(ids)``.
    """
    runs: list[list[int]] = []  # [action_id, count]
    for position, raw in enumerate(ids):
        action = int(raw)
        if not 0 <= action < len(ACTIONS):
            raise ActionSpecError(
                f"action id {action} at position {position} is out of range 0-{len(ACTIONS) - 1} "
                f"({', '.join(ACTIONS)})"
            )
        if runs and runs[-1][0] == action:
            runs[-1][1] += 1
        else:
            runs.append([action, 1])
    if not runs:
        raise ActionSpecError("cannot format an empty action sequence; a spec needs at least one action")
    return ",".join(ACTIONS[a] if n == 1 else f"{ACTIONS[a]}:{n}" for a, n in runs)

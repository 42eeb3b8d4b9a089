"""Per-frame action sequences: a compact text syntax, parsing and formatting.

Action-conditioned rollouts need one action id per generated frame.  Typing
hundreds of ids is impractical, so the command line takes a run-length spec
such as ``"right:16,up:8,none:4"`` that repeats cyclically to the requested
length, or a path to a file holding the same syntax or a JSON list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Index == action id.  The toy world owns its vocabulary (its dynamics and trained checkpoints
# depend on the order): the default here; other models name theirs (``bundle.action_names``).
from streamkd.data.toyworld import ACTIONS

__all__ = ["ACTIONS", "ActionSpecError", "check_action_names", "default_action_names", "format_action_spec",
           "parse_action_spec"]


def default_action_names(num_actions: int) -> list[str]:
    """A model's action names when its checkpoint names none: the toy camera's five (the ids of
    the toy videos' sidecars), else ``a0 .. a{N-1}``."""
    return list(ACTIONS) if num_actions == len(ACTIONS) else [f"a{i}" for i in range(num_actions)]


def check_action_names(names: Sequence[str], num_actions: int, field: str) -> None:
    """Raise unless ``names`` can name ``num_actions`` actions on the command line and the protocol."""
    if len(names) != num_actions:
        raise ValueError(f"{field} names {len(names)} actions, the model takes {num_actions}; give one name per id, in order")
    for name in names:
        if not name or name != name.strip().lower() or any(c in name for c in ",:#") or name.isdigit():
            raise ValueError(f"{field}: {name!r} is not a usable action name (lowercase, no spaces, ',', ':' or '#', "
                             "not a number: names are typed in --actions specs and sent by clients)")
    if len(set(names)) != len(names):
        raise ValueError(f"{field} repeats a name: {list(names)}")

def _allowed(names: tuple[str, ...]) -> str:
    example = "right:16,up:8,none:4" if names == ACTIONS else f"{names[-1]}:16,{names[0]}:4"
    return f"allowed: {', '.join(names)} (or ids 0-{len(names) - 1}); example: {example!r}"


class ActionSpecError(ValueError):
    """An action spec (string or file) cannot be turned into action ids."""


@dataclass(frozen=True)
class _Source:
    """Where a spec came from (for errors) and the vocabulary it is read in."""

    text: str
    names: tuple[str, ...]


def _fail(source: _Source, problem: str) -> ActionSpecError:
    # One line on purpose: these surface as CLI errors next to a flag name.
    return ActionSpecError(f"bad action spec {source.text}: {problem}; {_allowed(source.names)}")


def _is_uint(text: str) -> bool:
    # isascii() guards against Unicode digits such as "²" that int() rejects;
    # isdigit() already rejects "-1", "1.5", "+3" and "".
    return text.isascii() and text.isdigit()


def _action_id(name: str, source: _Source, where: str) -> int:
    key = name.strip().lower()
    if key in source.names:
        return source.names.index(key)
    if _is_uint(key) and int(key) < len(source.names):
        return int(key)
    hint = ""
    if os.sep in name or name.endswith((".txt", ".json")):
        hint = " (if this was meant as a file path, no such file exists)"
    raise _fail(source, f"unknown action {name.strip()!r} at {where}{hint}")


def _parse_segment(token: str, source: _Source, where: str) -> tuple[int, int]:
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


def _json_segments(text: str, source: _Source) -> Iterator[tuple[str, str]]:
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


def parse_action_spec(spec: str, num_frames: int, names: Sequence[str] = ACTIONS) -> list[int]:
    """Expand an action spec into exactly ``num_frames`` action ids.

    ``names``: the model's action vocabulary (``bundle.action_names``; the index is the id),
    the toy camera's by default.

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
    names = tuple(names)
    if not spec.strip():
        raise _fail(_Source(repr(spec), names), "the spec is empty")

    # os.path.isfile (unlike Path.is_file) swallows "name too long" and NUL
    # errors, which long or odd compact specs would otherwise trigger.
    if os.path.isfile(spec):
        path = Path(spec)
        source = _Source(f"file {str(path)!r}", names)
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
        source = _Source(repr(spec) if len(spec) <= 60 else repr(spec[:57] + "..."), names)
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


def format_action_spec(ids: Iterable[int], names: Sequence[str] = ACTIONS) -> str:
    """Run-length encode action ids into compact syntax (inverse of parsing).

    ``parse_action_spec(format_action_spec(ids, names), len(ids), names) == list(ids)``.
    """
    runs: list[list[int]] = []  # [action_id, count]
    for position, raw in enumerate(ids):
        action = int(raw)
        if not 0 <= action < len(names):
            raise ActionSpecError(
                f"action id {action} at position {position} is out of range 0-{len(names) - 1} "
                f"({', '.join(names)})"
            )
        if runs and runs[-1][0] == action:
            runs[-1][1] += 1
        else:
            runs.append([action, 1])
    if not runs:
        raise ActionSpecError("cannot format an empty action sequence; a spec needs at least one action")
    return ",".join(names[a] if n == 1 else f"{names[a]}:{n}" for a, n in runs)

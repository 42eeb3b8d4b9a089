"""Tests for streamkd.data.actions: compact/file action specs and their formatting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamkd.data.actions import ACTIONS, ActionSpecError, format_action_spec, parse_action_spec

NONE, UP, DOWN, LEFT, RIGHT = range(5)


def test_action_order_is_stable() -> None:
    assert ACTIONS == ("none", "up", "down", "left", "right")


def test_compact_parse() -> None:
    assert parse_action_spec("right:3,up:2,none:1", 6) == [RIGHT] * 3 + [UP] * 2 + [NONE]


def test_bare_names_whitespace_case_and_ids() -> None:
    assert parse_action_spec("  Right , up : 2 ,4,  left", 5) == [RIGHT, UP, UP, RIGHT, LEFT]


def test_repetition_fills_num_frames() -> None:
    assert parse_action_spec("right:2,down", 7) == [RIGHT, RIGHT, DOWN] * 2 + [RIGHT]


def test_truncation() -> None:
    assert parse_action_spec("right:16,up:8", 5) == [RIGHT] * 5


def test_huge_count_does_not_allocate() -> None:
    assert parse_action_spec("up:99999999999999,left:3", 4) == [UP] * 4


def test_text_file_with_comments(tmp_path: Path) -> None:
    spec = tmp_path / "actions.txt"
    spec.write_text("# warm-up\nnone:2\n\nright:3, up  # turn\n")
    assert parse_action_spec(str(spec), 8) == [NONE, NONE, RIGHT, RIGHT, RIGHT, UP, NONE, NONE]


def test_json_file(tmp_path: Path) -> None:
    spec = tmp_path / "actions.json"
    spec.write_text(json.dumps(["left", 1, "down:2"]))
    assert parse_action_spec(str(spec), 5) == [LEFT, UP, DOWN, DOWN, LEFT]


def assert_one_line_error(exc: pytest.ExceptionInfo[ActionSpecError], *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


ALLOWED = "none, up, down, left, right"
EXAMPLE = "right:16,up:8,none:4"


def test_unknown_name() -> None:
    with pytest.raises(ActionSpecError) as exc:
        parse_action_spec("right:2,jump:3", 4)
    assert_one_line_error(exc, "'jump'", "segment 2", ALLOWED, EXAMPLE)


def test_position_counts_skipped_empty_segments() -> None:
    with pytest.raises(ActionSpecError) as exc:
        parse_action_spec("right,,upp", 4)
    assert_one_line_error(exc, "'upp'", "segment 3")


def test_out_of_range_id() -> None:
    with pytest.raises(ActionSpecError) as exc:
        parse_action_spec("7", 4)
    assert_one_line_error(exc, "'7'", ALLOWED)


@pytest.mark.parametrize("count", ["0", "-1", "1.5", "x", "", "²"])
def test_bad_count(count: str) -> None:
    with pytest.raises(ActionSpecError) as exc:
        parse_action_spec(f"up:2,left:{count}", 4)
    assert_one_line_error(exc, f"count {count!r}", "segment 2", "positive integer", ALLOWED, EXAMPLE)


@pytest.mark.parametrize("spec", ["", "   ", ",", " , ,"])
def test_empty_spec(spec: str) -> None:
    with pytest.raises(ActionSpecError) as exc:
        parse_action_spec(spec, 4)
    assert_one_line_error(exc, ALLOWED, EXAMPLE)


@pytest.mark.parametrize("num_frames", [0, -3])
def test_bad_num_frames(num_frames: int) -> None:
    with pytest.raises(ActionSpecError, match="num_frames must be a positive integer"):
        parse_action_spec("up", num_frames)


@pytest.mark.parametrize("content", ["", "\n  \n", "# only a comment\n", "[]"])
def test_file_with_nothing_in_it(tmp_path: Path, content: str) -> None:
    spec = tmp_path / "empty.txt"
    spec.write_text(content)
    with pytest.raises(ActionSpecError) as exc:
        parse_action_spec(str(spec), 4)
    assert_one_line_error(exc, "empty.txt", "no actions", EXAMPLE)


def test_error_in_file_names_line(tmp_path: Path) -> None:
    spec = tmp_path / "a.txt"
    spec.write_text("up:2\nright:1,lft:3\n")
    with pytest.raises(ActionSpecError) as exc:
        parse_action_spec(str(spec), 4)
    assert_one_line_error(exc, "a.txt", "'lft'", "line 2, segment 2")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[1, true]", "JSON item 1"),
        ('["up", "jump"]', "'jump' at JSON item 1"),
        ('{"up": 1}', "JSON must be a list"),
        ('["up",', "invalid JSON"),
    ],
)
def test_bad_json_file(tmp_path: Path, content: str, fragment: str) -> None:
    spec = tmp_path / "a.json"
    spec.write_text(content)
    with pytest.raises(ActionSpecError) as exc:
        parse_action_spec(str(spec), 4)
    assert_one_line_error(exc, fragment, ALLOWED)


def test_missing_file_hint(tmp_path: Path) -> None:
    with pytest.raises(ActionSpecError) as exc:
        parse_action_spec(str(tmp_path / "nope.txt"), 4)
    assert_one_line_error(exc, "no such file")


@pytest.mark.parametrize(
    "ids",
    [
        [RIGHT] * 16 + [UP] * 8 + [NONE] * 4,
        [LEFT],
        [UP, DOWN, UP, DOWN, DOWN],
        [NONE, NONE, RIGHT, NONE],
    ],
)
def test_format_round_trip(ids: list[int]) -> None:
    assert parse_action_spec(format_action_spec(ids), len(ids)) == ids


def test_format_output() -> None:
    assert format_action_spec([RIGHT] * 16 + [UP] * 8 + [NONE] * 4) == EXAMPLE
    assert format_action_spec([UP, DOWN, DOWN]) == "up,down:2"


def test_format_errors() -> None:
    with pytest.raises(ActionSpecError, match="position 1 is out of range"):
        format_action_spec([UP, 9])
    with pytest.raises(ActionSpecError, match="empty"):
        format_action_spec([])

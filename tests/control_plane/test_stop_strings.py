"""StopStringMatcher: cuts at the first stop string, whatever the split into deltas, and never leaks."""

from __future__ import annotations

import random

import pytest

from pagedserve.control_plane.text.stop_strings import StopStringMatcher


def _random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=rng.randrange(0, min(len(text) - 1, 12) + 1)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def _stream(matcher: StopStringMatcher, deltas: list[str]) -> tuple[str, str | None]:
    """Feeds deltas until a match; returns (all emitted text, the match)."""
    pieces: list[str] = []
    for delta in deltas:
        emitted, matched = matcher.feed(delta)
        pieces.append(emitted)
        if matched is not None:
            return "".join(pieces), matched
    pieces.append(matcher.flush())
    return "".join(pieces), None


def _first_stop_by_brute_force(text: str, stop: tuple[str, ...]) -> tuple[str, str | None]:
    """Grows the text one character at a time; the first stop completed (longest on a tie) cuts it."""
    for end in range(1, len(text) + 1):
        completed = [s for s in stop if text[:end].endswith(s)]
        if completed:
            longest = max(completed, key=len)
            return text[: end - len(longest)], longest
    return text, None


CASES = [
    ("Once upon a time.\nThe end", ("\n",), "Once upon a time.", "\n"),
    ("The answer is 42 ### and more ###", ("###",), "The answer is 42 ", "###"),
    ("你好世界，再见世界", ("世界",), "你好", "世界"),
    ("emoji 😀😁😂 done", ("😁😂",), "emoji 😀", "😁😂"),
    ("abcabd", ("abd", "ca"), "ab", "ca"),
    ("xxabcd", ("bcd", "abc"), "xx", "abc"),
    ("xxabc", ("bc", "abc"), "xx", "abc"),
    ("aaab", ("aab",), "a", "aab"),
]


@pytest.mark.parametrize(("text", "stop", "before", "match"), CASES)
def test_emitted_text_is_text_before_first_stop_for_any_split(
    text: str, stop: tuple[str, ...], before: str, match: str
) -> None:
    rng = random.Random(7)
    for _ in range(200):
        emitted, matched = _stream(StopStringMatcher(stop, False), _random_split(text, rng))
        assert (emitted, matched) == (before, match)


@pytest.mark.parametrize(("text", "stop", "before", "match"), CASES)
def test_included_stop_string_ends_the_emitted_text_for_any_split(
    text: str, stop: tuple[str, ...], before: str, match: str
) -> None:
    rng = random.Random(11)
    for _ in range(200):
        emitted, matched = _stream(StopStringMatcher(stop, True), _random_split(text, rng))
        assert (emitted, matched) == (before + match, match)


def test_text_without_stop_is_emitted_whole_after_flush() -> None:
    rng = random.Random(3)
    text = "no stop string in here, only 文字 and 🙂"
    for _ in range(100):
        emitted, matched = _stream(StopStringMatcher(("STOP", "🙃"), False), _random_split(text, rng))
        assert (emitted, matched) == (text, None)


def test_holds_back_only_a_tail_that_could_start_a_stop() -> None:
    matcher = StopStringMatcher(("</end>",), False)
    assert matcher.feed("hello </e") == ("hello ", None)
    assert matcher.feed("x") == ("</ex", None)
    assert matcher.feed("done<") == ("done", None)
    assert matcher.flush() == "<"


def test_hold_never_exceeds_longest_stop_minus_one_character() -> None:
    matcher = StopStringMatcher(("abcd", "xy"), False)
    assert matcher.feed("abc") == ("", None)
    assert matcher.feed("- abcabc") == ("abc- abc", None)
    assert matcher.flush() == "abc"


def test_nothing_is_emitted_after_a_match() -> None:
    matcher = StopStringMatcher(("STOP",), False)
    assert matcher.feed("go STOP tail") == ("go ", "STOP")
    assert matcher.feed("more text") == ("", None)
    assert matcher.flush() == ""
    assert matcher.matched == "STOP"


def test_without_stop_strings_everything_passes_through() -> None:
    matcher = StopStringMatcher((), False)
    assert matcher.feed("abc") == ("abc", None)
    assert matcher.flush() == ""


def test_empty_stop_string_is_refused() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(("ok", ""), False)


def test_random_texts_with_random_stops_never_leak_past_the_first_stop() -> None:
    rng = random.Random(2024)
    alphabet = "ab 好😀\n"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
        stop = tuple({"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 4))) for _ in range(2)})
        emitted, matched = _stream(StopStringMatcher(stop, False), _random_split(text, rng))
        assert (emitted, matched) == _first_stop_by_brute_force(text, stop)


def test_word_pieces_between_held_tails_and_empty_deltas_never_change_the_cut() -> None:
    # Most deltas of real text hold no stop's first character and pass straight through; those that follow a held
    # tail, and empty ones, must still cut exactly where the whole text would.
    rng = random.Random(7)
    words = ["the", " cat", " sat", ".", "\n", "", " U", "ser", ":", "#", "##", " e", "nd"]
    stops = [("\n\n",), ("User:",), ("###", "end"), ("e", "sat.")]
    for _ in range(1000):
        deltas = [rng.choice(words) for _ in range(rng.randrange(1, 20))]
        stop = rng.choice(stops)
        assert _stream(StopStringMatcher(stop, False), deltas) == _first_stop_by_brute_force("".join(deltas), stop)

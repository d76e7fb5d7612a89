"""ReasoningSplitter: Gemma 4's `<|channel>thought\\n...<channel|>` split from the answer, however it is chunked."""

from __future__ import annotations

import itertools

import pytest

from engine.reasoning import ReasoningSplitter

THINKING_REPLY = "<|channel>thought\nThe user says hi.\nGreet back.<channel|>Hello! How can I help?"


def split(chunks: list[str], prompt: str = "") -> tuple[str, str]:
    splitter = ReasoningSplitter(prompt)
    reasoning, text = "", ""
    for chunk in [*chunks, None]:
        r, t = splitter.feed(chunk) if chunk is not None else splitter.flush()
        reasoning, text = reasoning + r, text + t
    return reasoning, text


def cut(stream: str, *positions: int) -> list[str]:
    bounds = [0, *positions, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def test_one_chunk():
    assert split([THINKING_REPLY]) == ("The user says hi.\nGreet back.", "Hello! How can I help?")


def test_every_split_into_two_and_three_chunks_gives_the_same_result():
    expected = ("The user says hi.\nGreet back.", "Hello! How can I help?")
    n = len(THINKING_REPLY)
    for i in range(n + 1):
        assert split(cut(THINKING_REPLY, i)) == expected, i
    for i, j in itertools.combinations(range(n + 1), 2):
        assert split(cut(THINKING_REPLY, i, j)) == expected, (i, j)


def test_character_by_character():
    assert split(list(THINKING_REPLY)) == ("The user says hi.\nGreet back.", "Hello! How can I help?")


def test_plain_text_streams_through_without_delay():
    splitter = ReasoningSplitter()
    assert splitter.feed("Hello") == ("", "Hello")
    assert splitter.feed(" world, 1 < 2") == ("", " world, 1 < 2")


def test_a_possible_marker_start_is_held_until_it_resolves():
    splitter = ReasoningSplitter()
    assert splitter.feed("a <|chan") == ("", "a ")
    assert splitter.feed("ge") == ("", "<|change")


def test_an_unfinished_marker_at_the_end_is_text():
    assert split(["x <chan"]) == ("", "x <chan")


def test_empty_thought_from_the_thinking_off_prompt_or_the_model():
    assert split(["<|channel>thought\n<channel|>Hi"]) == ("", "Hi")
    assert split(["<|channel>thought<channel|>Hi"]) == ("", "Hi")


def test_the_label_is_stripped_only_at_the_start_of_a_thought():
    assert split(["<|channel>thoughtful words<channel|>ok"]) == ("thoughtful words", "ok")
    assert split(["thought\nHi"]) == ("", "thought\nHi")
    assert split(["<|channel>thought\nthought\nx<channel|>"]) == ("thought\nx", "")


def test_a_thought_cut_off_by_max_tokens_stays_reasoning():
    assert split(["<|channel>thought\nStill think", "ing"]) == ("Still thinking", "")


def test_text_before_the_thought_is_kept():
    assert split(["Sure. <|channel>thought\nhm<channel|>Done"]) == ("hm", "Sure. Done")


def test_stray_and_repeated_markers_are_dropped_like_vllm_does():
    assert split(["<|channel>thought\na<|channel>b<channel|>c<channel|>d"]) == ("ab", "cd")


@pytest.mark.parametrize(
    ("prompt", "in_reasoning"),
    [
        ("<bos><|turn>user\nHi<turn|>\n<|turn>model\n", False),  # thinking on: the model opens the channel
        ("<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>", False),  # thinking off
        ("<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n", True),  # prompt left the channel open
        ("<|turn>model\n<|channel>thought\nx<channel|>y<turn|>\n<|turn>user\nHi<turn|>\n", False),
    ],
)
def test_the_prompt_decides_whether_the_reply_starts_inside_a_thought(prompt: str, in_reasoning: bool):
    reasoning, text = split(["more<channel|>answer"], prompt)
    assert (reasoning, text) == (("more", "answer") if in_reasoning else ("", "moreanswer"))

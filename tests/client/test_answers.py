"""Answer extraction and exact match: normalisation, number formats, every extractor."""

from __future__ import annotations

import pytest

from fedrot_client.answers import EXTRACTORS, answers_match, canonical_number, extractor_named
from fedrot_client.answers import normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Paris  ", "paris"),
        ("New\t  York\nCity", "new york city"),
        ("Paris.", "paris"),
        ("yes!?", "yes"),
        ('"Paris."', "paris"),
        ("'Paris'.", "paris"),
        ("\u201cParis\u201d", "paris"),
        ("STRASSE", "strasse"),
        ("Straße", "strasse"),  # casefold, not lower
        ("3.5", "3.5"),
        ("it's", "it's"),  # a lone quote is not a pair
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_normalize_answer_is_idempotent() -> None:
    for text in ['  "A  b."  ', "'x'!", "Q: ok;", '"""y"""']:
        once = normalize_answer(text)
        assert normalize_answer(once) == once


@pytest.mark.parametrize(
    ("number", "expected"),
    [("42", "42"), ("42.0", "42"), ("42.50", "42.5"), ("-3", "-3"), ("-0.0", "0"),
     ("1,234", "1234"), ("-1,234,567.80", "-1234567.8"), ("0.001", "0.001"), ("100", "100")],
)  # fmt: skip
def test_canonical_number(number: str, expected: str) -> None:
    assert canonical_number(number) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The total is 42.", "42"),
        ("3 apples and 5 pears, so 8.0 fruits", "8"),
        ("costs $1,234 in all", "1234"),
        ("it drops to -7 degrees", "-7"),
        ("pages 5-10", "10"),  # a range's hyphen is no minus sign
        ("x = 3.25", "3.25"),
        ("list 1,2,3", "3"),  # not thousands groups
        ("no digits here", None),
    ],
)
def test_last_number(text: str, expected: str | None) -> None:
    assert extractor_named("last-number")(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
        ("#### 1,000", "1000"),
        ("####-12.50", "-12.5"),
        ("the answer is 7", None),
    ],
)
def test_gsm8k(text: str, expected: str | None) -> None:
    assert extractor_named("gsm8k")(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So the answer is 42.", "42"),
        ("THE ANSWER IS: $1,234.00. Done.", "1234"),
        ("The answer is Paris. It has 2 million people.", "paris"),
        ("First the answer is 3, no wait, the answer is 5.", "5"),  # the last one counts
        ("The answer is 2 apples", "2"),
        ("I think the answer is\n", None),
        ("I do not know", None),
    ],
)
def test_answer_is(text: str, expected: str | None) -> None:
    assert extractor_named("answer-is")(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris.\nThe capital of France is Paris.", "paris"),
        ("\n  \n Rome \nmore", "rome"),  # the first non-blank line
        (" \n\t", None),
    ],
)
def test_exact(text: str, expected: str | None) -> None:
    assert extractor_named("exact")(text) == expected


def test_regex_takes_the_first_group_of_the_first_match() -> None:
    extract = extractor_named(r"regex:Answer: (\w+)")
    assert extract("Answer: Yes. Answer: No") == "yes"
    assert extract("nothing") is None


def test_regex_without_a_group_takes_the_whole_match() -> None:
    assert extractor_named(r"regex:[A-D]\)")("I pick B) because") == "b)"


def test_regex_with_an_unmatched_optional_group_finds_nothing() -> None:
    assert extractor_named(r"regex:x(\d)?")("x") is None


def test_a_bad_regex_is_named() -> None:
    with pytest.raises(ValueError, match=r"bad extractor pattern '\(unclosed'"):
        extractor_named("regex:(unclosed")


def test_an_unknown_extractor_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown answer extractor 'numbers'") as raised:
        extractor_named("numbers")
    for name in (*EXTRACTORS, "regex:<pattern>"):
        assert name in str(raised.value)


@pytest.mark.parametrize(
    ("prediction", "reference", "extractor", "expected"),
    [
        ("Paris.", "paris", "exact", True),
        ("Paris\nand then more text", "Paris", "exact", True),
        ("London", "Paris", "exact", False),
        ("so 42.0", "#### 42", "gsm8k", False),  # no #### in the prediction: a miss
        ("#### 42.0", "#### 42", "gsm8k", True),
        ("#### 42", "42.0", "gsm8k", True),  # a bare reference stands for itself
        ("#### 41", "42", "gsm8k", False),
        ("we get 1,234 in total", "#### 1234", "last-number", True),
        ("we get 1,235", "#### 1234", "last-number", False),
        ("no number", "7", "last-number", False),
        ("Thus the answer is 7.", "7", "answer-is", True),
        ("The answer is Blue!", "blue", "answer-is", True),
        ("Answer: B", "B", r"regex:Answer: ([A-D])", True),
        ("Answer: C", "the answer: B", r"regex:Answer: ([A-D])", False),
    ],
)
def test_answers_match(prediction: str, reference: str, extractor: str, expected: bool) -> None:
    assert answers_match(prediction, reference, extractor_named(extractor)) is expected

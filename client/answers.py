"""Answers pulled out of generated text, and exact match between a prediction and a reference.

An :data:`Extractor` maps a text (a model's generation or a reference completion) to its
normalised answer, or ``None`` when the text holds none. Built-ins, by name
(:func:`extractor_named`):

- ``exact``: the first non-blank line (generations run on past the answer), normalised;
- ``last-number``: the last number in the text;
- ``gsm8k``: the number after ``####`` (GSM8K's reference format);
- ``answer-is``: what follows the last "the answer is" (case-insensitive): a number when the
  sentence starts with one, else the rest of the sentence;
- ``regex:<pattern>``: the first capture group of the first match (the whole match when the
  pattern has no group), normalised.

Numbers are written canonically: thousands separators dropped, trailing fractional zeros
dropped, so ``"1,234"`` is ``"1234"`` and ``"42.0"`` is ``"42"``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from decimal import Decimal

Extractor = Callable[[str], str | None]

# An optional minus (not a hyphen inside a word or a range), digits with or without
# comma-grouped thousands, an optional fraction.
NUMBER_PATTERN = r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_NUMBER = re.compile(NUMBER_PATTERN)
_GSM8K_ANSWER = re.compile(r"####\s*(" + NUMBER_PATTERN + ")")
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)
_LEADING_NUMBER = re.compile(r"[\s:*$\"'(]*(" + NUMBER_PATTERN + ")")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")
_WHITESPACE = re.compile(r"\s+")

SENTENCE_PUNCTUATION = ".,;:!?"
QUOTE_PAIRS: tuple[tuple[str, str], ...] = (
    ('"', '"'), ("'", "'"), ("`", "`"), ("\u201c", "\u201d"), ("\u2018", "\u2019"),
)  # fmt: skip
REGEX_PREFIX = "regex:"


def normalize_answer(text: str) -> str:
    """Casefolded, whitespace runs collapsed to one space, stripped, with trailing sentence
    punctuation and surrounding quotes removed (repeatedly: ``'"Paris."'`` -> ``paris``)."""
    text = _WHITESPACE.sub(" ", text.casefold()).strip()
    previous = None
    while text != previous:
        previous = text
        text = text.rstrip(SENTENCE_PUNCTUATION).strip()
        for opening, closing in QUOTE_PAIRS:
            if len(text) >= 2 and text.startswith(opening) and text.endswith(closing):
                text = text[len(opening) : -len(closing)].strip()
    return text


def canonical_number(number: str) -> str:
    """``number`` (as :data:`NUMBER_PATTERN` matches it) without thousands separators or
    trailing fractional zeros: ``"-1,234.50"`` -> ``"-1234.5"``, ``"42.0"`` -> ``"42"``."""
    value = Decimal(number.replace(",", ""))
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_exact(text: str) -> str | None:
    """The first non-blank line of ``text``, normalised; ``None`` when every line is blank."""
    for line in text.splitlines():
        answer = normalize_answer(line)
        if answer:
            return answer
    return None


def extract_last_number(text: str) -> str | None:
    """The last number in ``text``, canonical; ``None`` when there is none."""
    numbers = _NUMBER.findall(text)
    return canonical_number(numbers[-1]) if numbers else None


def extract_gsm8k(text: str) -> str | None:
    """The number after the first ``####``, canonical; ``None`` without one."""
    found = _GSM8K_ANSWER.search(text)
    return canonical_number(found.group(1)) if found else None


def extract_answer_is(text: str) -> str | None:
    """After the last "the answer is": a leading number (canonical), else the rest of that
    sentence (normalised); ``None`` without the phrase or with nothing after it."""
    starts = [found.end() for found in _ANSWER_IS.finditer(text)]
    if not starts:
        return None
    rest = text[starts[-1] :]
    end = _SENTENCE_END.search(rest)
    sentence = rest[: end.start()] if end else rest
    number = _LEADING_NUMBER.match(sentence)
    if number:
        return canonical_number(number.group(1))
    return normalize_answer(sentence.lstrip(" :")) or None


def regex_extractor(pattern: str) -> Extractor:
    """An extractor returning the first group (or whole match) of ``pattern``, normalised."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"bad extractor pattern {pattern!r}: {exc}") from exc

    def extract(text: str) -> str | None:
        found = compiled.search(text)
        if found is None:
            return None
        answer = found.group(1) if compiled.groups else found.group(0)
        return None if answer is None else normalize_answer(answer)

    return extract


EXTRACTORS: Mapping[str, Extractor] = {
    "exact": extract_exact,
    "last-number": extract_last_number,
    "gsm8k": extract_gsm8k,
    "answer-is": extract_answer_is,
}


def extractor_named(spec: str) -> Extractor:
    """The built-in extractor ``spec`` names, or ``regex:<pattern>``'s."""
    if spec.startswith(REGEX_PREFIX):
        return regex_extractor(spec[len(REGEX_PREFIX) :])
    extractor = EXTRACTORS.get(spec)
    if extractor is None:
        valid = ", ".join([*EXTRACTORS, REGEX_PREFIX + "<pattern>"])
        raise ValueError(f"unknown answer extractor {spec!r}; valid: {valid}")
    return extractor


def _canonical_if_number(text: str) -> str:
    return canonical_number(text) if _NUMBER.fullmatch(text) else text


def answers_match(prediction: str, reference: str, extractor: Extractor) -> bool:
    """Whether ``extractor``'s answer in ``prediction`` equals the reference's.

    A prediction without an answer is a miss; a reference without one (a bare ``"42.0"`` under
    ``gsm8k``) stands for itself, normalised (and canonical when it is one number).
    """
    predicted = extractor(prediction)
    if predicted is None:
        return False
    expected = extractor(reference)
    if expected is None:
        expected = _canonical_if_number(normalize_answer(reference))
    return normalize_answer(predicted) == normalize_answer(expected)

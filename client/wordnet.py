"""A labelled text dataset from WordNet's glosses (Debian ``wordnet-base``), and its shards.

Every synset line of ``data.noun``, ``data.verb``, ``data.adj`` and ``data.adv`` holds the
synset's lexicographer file number (0..44, one of the 45 :data:`LEXNAMES`), its words, and a
gloss after ``" | "``. The classification task is gloss -> lexicographer category (45 classes);
the generative variant is word -> gloss text for causal-LM fine-tuning; the reverse dictionary
is an instruction task (a chat: "Which word is defined as: <gloss>?" -> the word), scored by
exact match of the generated word.

``python -m fedrot_client.wordnet OUT`` writes ``client-<i>.jsonl`` train shards (a seeded
label-Dirichlet split), ``eval.jsonl`` (held out) and ``labels.json`` (the label vocabulary).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedrot_client.data import LabelVocabulary
from fedrot_client.errors import DataError
from fedrot_client.shards import SplitOptions, write_split

logger = logging.getLogger(__name__)

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
PARTS: tuple[str, ...] = ("adj", "adv", "noun", "verb")

# WordNet's lexnames file: the lexicographer file number is the index.
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal",
    "noun.artifact", "noun.attribute", "noun.body", "noun.cognition", "noun.communication",
    "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
    "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip
LEXNAME_VOCABULARY = LabelVocabulary(LEXNAMES)


@dataclass(frozen=True)
class Synset:
    """One synset line: ``lex_filenum`` indexes :data:`LEXNAMES`; ``words`` use spaces."""

    offset: int
    pos: str
    lex_filenum: int
    words: tuple[str, ...]
    gloss: str

    @property
    def category(self) -> str:
        return LEXNAMES[self.lex_filenum]


def parse_synset_line(line: str, where: str = "<line>") -> Synset:
    """Parse one ``data.*`` line (not a licence line, which starts with a space)."""
    head, sep, gloss = line.partition(" | ")
    fields = head.split()
    if not sep or len(fields) < 6 or not gloss.strip():
        raise DataError(f"{where}: not a synset line with a gloss")
    try:
        offset, lex_filenum, word_count = int(fields[0]), int(fields[1]), int(fields[3], 16)
    except ValueError as exc:
        raise DataError(f"{where}: bad offset, lex_filenum or w_cnt ({exc})") from exc
    if not 0 <= lex_filenum < len(LEXNAMES):
        raise DataError(f"{where}: lex_filenum {lex_filenum} outside 0..{len(LEXNAMES) - 1}")
    raw_words = fields[4 : 4 + 2 * word_count : 2]
    if len(raw_words) != word_count or word_count == 0:
        raise DataError(f"{where}: w_cnt {word_count} but {len(raw_words)} words")
    words = tuple(_clean_word(w) for w in raw_words)
    return Synset(offset, fields[2], lex_filenum, words, gloss.strip())


def _clean_word(raw: str) -> str:
    """``"beautiful(a)"`` -> ``"beautiful"``, ``"take_a_breath"`` -> ``"take a breath"``."""
    word = raw.split("(", 1)[0] if raw.endswith(")") else raw
    return word.replace("_", " ")


def read_synsets(
    directory: str | Path = DEFAULT_WORDNET_DIR,
    parts: Sequence[str] = PARTS,
    *,
    limit_per_part: int | None = None,
) -> list[Synset]:
    """Every synset of the ``data.<part>`` files, in file order (deterministic)."""
    synsets: list[Synset] = []
    for part in parts:
        path = Path(directory) / f"data.{part}"
        if not path.is_file():
            raise DataError(
                f"{path}: missing; install Debian's wordnet-base (apt-get install wordnet-base)"
            )
        synsets.extend(_read_part(path, limit_per_part))
    return synsets


def _read_part(path: Path, limit: int | None) -> Iterator[Synset]:
    count = 0
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if line.startswith(" ") or not line.strip():
                continue  # the licence header
            if limit is not None and count >= limit:
                return
            count += 1
            yield parse_synset_line(line.rstrip("\n"), where=f"{path}:{number}")


def classification_record(synset: Synset, *, with_word: bool = False) -> dict[str, object]:
    """``{"text": gloss or "word: gloss", "label": lexname, ...}`` for one synset."""
    text = f"{synset.words[0]}: {synset.gloss}" if with_word else synset.gloss
    return {"text": text, "label": synset.category, "word": synset.words[0],
            "offset": synset.offset, "pos": synset.pos}  # fmt: skip


def generation_record(synset: Synset) -> dict[str, object]:
    """``{"text": "word: gloss", "prompt": "word:", "completion": " gloss"}`` (word -> gloss)."""
    word = synset.words[0]
    return {"text": f"{word}: {synset.gloss}", "prompt": f"{word}:",
            "completion": f" {synset.gloss}", "label": synset.category}  # fmt: skip


REVERSE_DICTIONARY_QUESTION = "Which word is defined as: {gloss}? Answer with the word only."
MAX_DEFINITION_CHARS = 120
MIN_WORD_COUNT = 20
"""The reverse dictionary asks only about head words tagged at least this often (common words)."""


def definition_of(synset: Synset) -> str:
    """The gloss's definition: the part before its first quoted example."""
    return synset.gloss.split('; "', 1)[0].split(' "', 1)[0].strip().rstrip(";").strip()


def fits_reverse_dictionary(synset: Synset) -> bool:
    """A one-word, lowercase, alphabetic head word of 3 to 12 letters, and a definition of at
    most :data:`MAX_DEFINITION_CHARS` characters that does not give the word away."""
    word, definition = synset.words[0], definition_of(synset)
    return (word.isascii() and word.isalpha() and word.islower() and 3 <= len(word) <= 12
            and 0 < len(definition) <= MAX_DEFINITION_CHARS
            and word not in definition.lower())  # fmt: skip


def word_counts(directory: str | Path = DEFAULT_WORDNET_DIR) -> Counter[str]:
    """How often each word was tagged in WordNet's semantic concordance (``cntlist.rev``, all
    senses together; spaces for underscores): a word-frequency proxy."""
    counts: Counter[str] = Counter()
    path = Path(directory) / "cntlist.rev"
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) == 3 and fields[2].isdigit():
                    counts[fields[0].split("%", 1)[0].replace("_", " ")] += int(fields[2])
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc}); install Debian's wordnet-base") from exc
    return counts


def reverse_dictionary_record(synset: Synset) -> dict[str, object]:
    """A chat: the user asks for the word a definition defines, the assistant answers it."""
    question = REVERSE_DICTIONARY_QUESTION.format(gloss=definition_of(synset))
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": synset.words[0]}],
            "label": synset.category}  # fmt: skip


def reverse_dictionary_synsets(
    synsets: Sequence[Synset],
    directory: str | Path = DEFAULT_WORDNET_DIR,
    min_word_count: int = MIN_WORD_COUNT,
) -> list[Synset]:
    """The synsets the reverse dictionary asks about: those that fit it
    (:func:`fits_reverse_dictionary`) whose head word was tagged at least ``min_word_count``
    times in the concordance (common words, which a small model may know)."""
    counts = word_counts(directory)
    return [s for s in synsets
            if fits_reverse_dictionary(s) and counts[s.words[0]] >= min_word_count]  # fmt: skip


@dataclass(frozen=True)
class ShardOptions:
    """How ``write_shards`` splits WordNet across clients."""

    num_clients: int = 3
    alpha: float = 0.5
    seed: int = 0
    eval_size: int = 1000
    max_per_client: int | None = 2000
    with_word: bool = False
    generative: bool = False
    reverse_dictionary: bool = False  # chat rows: definition -> word (keep fitting synsets)
    min_word_count: int = MIN_WORD_COUNT  # reverse dictionary: words tagged at least this often


def write_shards(
    synsets: Sequence[Synset], out_dir: str | Path, options: ShardOptions,
    wordnet_dir: str | Path = DEFAULT_WORDNET_DIR,
) -> dict[str, object]:
    """Write ``client-<i>.jsonl``, ``eval.jsonl``, ``labels.json`` and ``manifest.json``
    (:func:`fedrot_client.shards.write_split`).

    Returns the manifest: per-file example counts, per-client label histograms and the skew.
    """
    if options.reverse_dictionary:
        synsets = reverse_dictionary_synsets(synsets, wordnet_dir, options.min_word_count)
    labels = np.array([s.lex_filenum for s in synsets], dtype=np.int64)
    split = SplitOptions(num_clients=options.num_clients, alpha=options.alpha, seed=options.seed,
                         eval_size=options.eval_size, max_per_client=options.max_per_client)
    task = ("reverse-dictionary" if options.reverse_dictionary
            else "generation" if options.generative else "classification")
    describe = {"source": "wordnet", "task": task, "options": asdict(options)}
    return write_split([_record(s, options) for s in synsets], labels, out_dir, split,
                       num_groups=len(LEXNAMES), label_names=LEXNAMES, describe=describe)


def _record(synset: Synset, options: ShardOptions) -> dict[str, object]:
    if options.reverse_dictionary:
        return reverse_dictionary_record(synset)
    if options.generative:
        return generation_record(synset)
    return classification_record(synset, with_word=options.with_word)


def _parser() -> argparse.ArgumentParser:
    defaults = ShardOptions()
    parser = argparse.ArgumentParser(
        prog="python -m fedrot_client.wordnet",
        description="Write WordNet gloss -> lexicographer-category shards for N clients.",
    )
    parser.add_argument("out_dir", type=Path, help="folder for the JSONL files")
    parser.add_argument("--wordnet-dir", type=Path, default=DEFAULT_WORDNET_DIR)
    parser.add_argument("--clients", type=int, default=defaults.num_clients)
    parser.add_argument("--alpha", type=float, default=defaults.alpha,
                        help="Dirichlet concentration; smaller is more label-skewed")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--eval-size", type=int, default=defaults.eval_size)
    parser.add_argument("--max-per-client", type=int, default=defaults.max_per_client,
                        help="cap on examples per client (0: no cap)")
    parser.add_argument("--with-word", action="store_true", help='text = "word: gloss"')
    parser.add_argument("--generative", action="store_true",
                        help="word -> gloss records for causal-LM training")
    parser.add_argument("--reverse-dictionary", action="store_true",
                        help="chat records: definition -> word (instruction tuning)")
    return parser  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """The command: parse, write the shards, print the manifest's counts."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    options = ShardOptions(
        num_clients=args.clients, alpha=args.alpha, seed=args.seed, eval_size=args.eval_size,
        max_per_client=args.max_per_client or None, with_word=args.with_word,
        generative=args.generative, reverse_dictionary=args.reverse_dictionary,
    )  # fmt: skip
    synsets = read_synsets(args.wordnet_dir)
    manifest = write_shards(synsets, args.out_dir, options, args.wordnet_dir)
    print(json.dumps({"counts": manifest["counts"], "label_skew": manifest["label_skew"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

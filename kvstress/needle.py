"""Needle in a haystack: what does a compressed KV cache forget?

    kvstress needle --lengths 1k,2k,4k --depths 0,50,100 --needles 3 -m baseline -m h2o_4_32_256

For each context length L, depth d and trial i, a prompt of exactly L tokens:

    head | haystack[:k] | needle | haystack[k:] | tail
    head      nothing (or the BOS token the tokenizer adds); with --chat, the chat
              template up to the user's message
    haystack  H real-text tokens: a seeded segment of the corpus, H = L - head - needle - tail
    needle    "\\nThe magic number is 73914.\\n" (a seeded 5-digit number per trial)
    k         round(d * H): the needle's first token sits at head + round(d * H), so with
              no head at d * (L - needle - question) tokens. The segment is shifted (never
              the needle) so that the text before the needle ends a sentence or a line
              when the corpus allows it.
    tail      "What is the magic number? The magic number is" (the question), or with
              --chat the rest of the template around it, ending in the answer's start

The prompt goes through the method's cache the honest way: the context (head to the
end of the haystack) in prefill chunks, then the tail in its own forward, so the question
sees the needle only through what the cache kept; then greedy decoding, one token per
forward, for a few tokens. The answer's first number is scored against the needle:
exact, partial (a prefix of half or more of the digits, half or more of the digits in
place, or the number appearing later) or wrong. accuracy = exact / trials.

Results (kind "needle"): one event "needle_cell" per (method, length, depth) with the
trials, counts, accuracy and every answer, written as each cell finishes; one record per
(method, length) with status, time to first token, decode time and memory; an OOM
writes an "oom" record at the length it hit and the method stops there.
Same seed, same corpus and tokenizer: the same haystacks, needles and numbers, for every
method.
"""

from __future__ import annotations

import math
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import ConfigError
from .spec import MethodSpec

CELL_EVENT = "needle_cell"
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)  # percent
NEEDLE = "\nThe magic number is {number}.\n"
QUESTION = "\n\nWhat is the magic number? The magic number is"
CHAT_QUESTION = "What is the magic number mentioned in the text above?"
ANSWER_START = "The magic number is"
SCORES = ("exact", "partial", "wrong")
# Smallest haystack worth the name: below it the depths cannot be told apart.
MIN_HAYSTACK = 16
_PLACEHOLDER = "\x00HAYSTACK\x00"
_BOUNDARY_ENDS = (".", "!", "?", "\n")


# --- options --------------------------------------------------------------------------


def parse_depths(text: str) -> tuple[float, ...]:
    """`0,25,50,75,100` (percent of the haystack) → (0.0, 25.0, 50.0, 75.0, 100.0)."""
    depths: list[float] = []
    for part in text.split(","):
        part = part.strip().rstrip("%").strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"cannot read depth {part!r}: write percentages like 0,25,50,75,100") from None
        if not 0 <= value <= 100:
            raise ConfigError(f"depth {part} is outside 0..100: depths are percent of the haystack")
        if value not in depths:
            depths.append(value)
    if not depths:
        raise ConfigError("--depths is empty: give percentages like 0,25,50,75,100")
    return tuple(sorted(depths))


@dataclass(frozen=True)
class NeedleConfig:
    methods: tuple[MethodSpec, ...]
    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    depths: tuple[float, ...] = DEFAULT_DEPTHS
    needles: int = 3
    seed: int = 0
    model: str = "smollm2-135m"
    dataset: str | None = None
    chunk: int = 512
    max_new_tokens: int = 24
    device: str = "auto"
    dtype: str = "auto"
    positions: str = "original"
    chat: bool = False
    out: Path = field(default=Path("needle.json"))

    def __post_init__(self) -> None:
        from .caches import POSITION_MODES

        if not self.methods:
            raise ConfigError("no method to run: give --method baseline, streaming, h2o or a spec string")
        if not self.lengths or list(self.lengths) != sorted(set(self.lengths)) or self.lengths[0] <= 0:
            raise ConfigError("--lengths must be positive and increasing, e.g. 1k,2k,4k")
        if not self.depths or any(not 0 <= d <= 100 for d in self.depths):
            raise ConfigError("--depths must be percentages between 0 and 100, e.g. 0,50,100")
        if self.needles < 1:
            raise ConfigError(f"--needles must be at least 1 per cell, got {self.needles}")
        if self.chunk <= 0:
            raise ConfigError(f"--chunk must be positive, got {self.chunk}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.positions not in POSITION_MODES:
            raise ConfigError(f"--positions must be one of {', '.join(POSITION_MODES)}, got {self.positions!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")

    def to_json(self) -> dict:
        data = asdict(self)
        data["methods"] = [spec.name for spec in self.methods]
        data["lengths"] = list(self.lengths)
        data["depths"] = list(self.depths)
        data["out"] = str(self.out)
        return data


# --- prompts ----------------------------------------------------------------------------


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def _encode(tokenizer, text: str) -> list[int]:
    from .models import tokenize_text

    return tokenize_text(tokenizer, text).tolist()


class PromptBuilder:
    """The fixed parts of every prompt (head, tail) and the needle's tokens, for one tokenizer."""

    def __init__(self, tokenizer, *, chat: bool = False, model_name: str = "the model"):
        self.tokenizer = tokenizer
        self.chat = chat
        if chat:
            if not has_chat_template(tokenizer):
                raise ConfigError(
                    f"--chat needs a tokenizer with a chat template and {model_name}'s has none: "
                    "drop --chat (plain continuation prompt) or use an instruction-tuned model such as smollm2-135m"
                )
            messages = [{"role": "user", "content": f"{_PLACEHOLDER}\n\n{CHAT_QUESTION}"}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            head, _, tail = text.partition(_PLACEHOLDER)
            self.head = _encode(tokenizer, head)
            self.tail = _encode(tokenizer, tail + ANSWER_START)
        else:
            self.head = _default_prefix(tokenizer)
            self.tail = _encode(tokenizer, QUESTION)

    def needle(self, number: str) -> list[int]:
        return _encode(self.tokenizer, NEEDLE.format(number=number))

    def overhead(self, number: str = "00000") -> int:
        """Prompt tokens that are not haystack."""
        return len(self.head) + len(self.needle(number)) + len(self.tail)

    def decode(self, ids: Sequence[int]) -> str:
        from .models import ByteTokenizer

        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.decode(list(ids))
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def _default_prefix(tokenizer) -> list[int]:
    """The BOS token when the tokenizer adds one by default (Llama), else nothing (SmolLM2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or not callable(tokenizer) or not hasattr(tokenizer, "convert_ids_to_tokens"):
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


@dataclass(frozen=True)
class Trial:
    """One prompt: a needle hidden at a depth of a haystack of `length` tokens in all."""

    length: int
    depth: float  # percent
    index: int
    number: str
    offset: int  # where the haystack segment starts in the corpus tokens
    needle_position: int  # the needle's first token, counted from the prompt's start
    needle_tokens: int
    context_tokens: int  # head + haystack + needle: fed in prefill chunks; the tail follows
    ids: tuple[int, ...]


class Haystack:
    """Corpus tokens and where the text ends a sentence or a line (a needle goes after one)."""

    def __init__(self, tokens: torch.Tensor | Sequence[int], builder: PromptBuilder):
        self.tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        ends = {}
        for token in set(self.tokens):
            text = builder.decode([token]).rstrip(" ")
            ends[token] = text.endswith(_BOUNDARY_ENDS)
        self.boundary = [ends[token] for token in self.tokens]

    def __len__(self) -> int:
        return len(self.tokens)


def make_trial(builder: PromptBuilder, haystack: Haystack, length: int, depth: float, index: int,
               seed: int) -> Trial:
    """The prompt for trial `index` of cell (length, depth): the same for the same arguments."""
    rng = random.Random(f"kvstress-needle:{seed}:{length}:{depth}:{index}")
    number = str(rng.randint(10000, 99999))
    needle = builder.needle(number)
    size = length - len(builder.head) - len(needle) - len(builder.tail)
    if size < MIN_HAYSTACK:
        raise ConfigError(
            f"length {length} leaves {size} haystack tokens after the needle and question "
            f"({length - size} tokens): use lengths of at least {length - size + MIN_HAYSTACK}"
        )
    if len(haystack) < size:
        raise ConfigError(
            f"the text has only {len(haystack)} tokens but a {length}-token prompt needs {size}: "
            "use shorter --lengths or a longer --dataset"
        )
    split = round(depth / 100 * size)
    last_start = len(haystack) - size
    offset = rng.randint(0, last_start)
    if split > 0:
        # Slide the segment forward (wrapping) to the first start whose text before the
        # needle ends a sentence or a line; keep the random start when there is none.
        for step in range(last_start + 1):
            start = (offset + step) % (last_start + 1)
            if haystack.boundary[start + split - 1]:
                offset = start
                break
    segment = haystack.tokens[offset : offset + size]
    ids = builder.head + segment[:split] + needle + segment[split:] + builder.tail
    assert len(ids) == length, (len(ids), length)
    return Trial(length=length, depth=depth, index=index, number=number, offset=offset,
                 needle_position=len(builder.head) + split, needle_tokens=len(needle),
                 context_tokens=length - len(builder.tail), ids=tuple(ids))


def make_trials(builder: PromptBuilder, haystack: Haystack, lengths: Sequence[int], depths: Sequence[float],
                needles: int, seed: int) -> dict[tuple[int, float], list[Trial]]:
    """Every cell's trials, built (and checked) before any model runs."""
    return {
        (length, depth): [make_trial(builder, haystack, length, depth, i, seed) for i in range(needles)]
        for length in lengths
        for depth in depths
    }


# --- scoring ----------------------------------------------------------------------------

# A number: digits, with thousands commas allowed between them ("73,914").
_NUMBER = re.compile(r"\d(?:[\d,]*\d)?")
_COMPLETE = re.compile(r"\d(?:[\d,]*\d)?[^\d,]")


def answer_numbers(answer: str) -> list[str]:
    return [match.replace(",", "") for match in _NUMBER.findall(answer)]


def score_answer(answer: str, number: str) -> str:
    """exact: the answer's first number is the needle's. partial: a prefix of half or more
    of the digits, half or more of the digits in place, or the needle as a later number.
    Else wrong: a two-digit guess like "11" must not count for 11726."""
    numbers = answer_numbers(answer)
    if not numbers:
        return "wrong"
    first = numbers[0]
    if first == number:
        return "exact"
    if any(number in n for n in numbers):
        return "partial"
    half = math.ceil(len(number) / 2)
    prefix = 0
    for a, b in zip(first, number):
        if a != b:
            break
        prefix += 1
    in_place = sum(a == b for a, b in zip(first, number))
    if prefix >= half or in_place >= half:
        return "partial"
    return "wrong"


def answer_complete(answer: str) -> bool:
    """A number followed by something that is not part of it: decoding can stop."""
    return _COMPLETE.search(answer) is not None


# --- running ----------------------------------------------------------------------------

ProgressCallback = Callable[[str, int], None]  # (method, trials just done)
Notify = Callable[[str], None]


@dataclass
class _Answer:
    text: str
    ttft_s: float
    step_ms: list[float]
    cache_bytes: int
    cache_tokens: int


class NeedleRunner:
    """Runs every cell of every method through the model and writes results as it goes."""

    def __init__(self, config: NeedleConfig, model, builder: PromptBuilder,
                 trials: dict[tuple[int, float], list[Trial]], writer, *,
                 on_progress: ProgressCallback | None = None):
        from .memory import MemorySampler
        from .stream import cache_argument

        self.config = config
        self.model = model
        self.builder = builder
        self.trials = trials
        self.writer = writer
        self.on_progress = on_progress or (lambda method, n: None)
        self.device = next(model.parameters()).device
        self.sampler = MemorySampler(self.device)
        self.cache_argument = cache_argument(model)
        eos = getattr(builder.tokenizer, "eos_token_id", None)
        self.eos = {eos} if isinstance(eos, int) else set()
        if self.builder.chat:
            for token in ("<|im_end|>", "<|eot_id|>"):
                token_id = _token_id(builder.tokenizer, token)
                if token_id is not None:
                    self.eos.add(token_id)

    def _forward(self, cache, ids: list[int] | tuple[int, ...]) -> torch.Tensor:
        """Feed ids; return the last position's logits [vocab]."""
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        output = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1,
                            **{self.cache_argument: cache})
        self.sampler.sample(None)
        return output.logits[0, -1]

    def answer(self, spec: MethodSpec, trial: Trial) -> _Answer:
        """Prefill the context in chunks, the question in one forward, then decode greedily."""
        from .caches import cache_bytes, cached_tokens, make_run_cache
        from .stream import synchronize

        config = self.config
        cache = make_run_cache(spec, self.model, positions=config.positions, lazy=0)
        ids = trial.ids
        generated: list[int] = []
        step_ms: list[float] = []
        with torch.no_grad():
            synchronize(self.device)
            began = time.perf_counter()
            for start in range(0, trial.context_tokens, config.chunk):
                self._forward(cache, ids[start : min(start + config.chunk, trial.context_tokens)])
            logits = self._forward(cache, ids[trial.context_tokens :])
            token = int(logits.argmax())
            synchronize(self.device)
            ttft_s = time.perf_counter() - began
            size = (cache_bytes(cache), cached_tokens(cache))
            while True:
                generated.append(token)
                if token in self.eos or len(generated) >= config.max_new_tokens:
                    break
                if answer_complete(self.builder.decode(generated)):
                    break
                began = time.perf_counter()
                token = int(self._forward(cache, [token]).argmax())
                synchronize(self.device)
                step_ms.append((time.perf_counter() - began) * 1000)
        del cache
        return _Answer(self.builder.decode([t for t in generated if t not in self.eos]), ttft_s, step_ms, *size)

    def _cell(self, spec: MethodSpec, length: int, depth: float) -> dict:
        trials = self.trials[(length, depth)]
        counts = dict.fromkeys(SCORES, 0)
        answers, timings = [], []
        for trial in trials:
            result = self.answer(spec, trial)
            score = score_answer(result.text, trial.number)
            counts[score] += 1
            answers.append({"number": trial.number, "answer": result.text, "score": score,
                            "needle_position": trial.needle_position, "offset": trial.offset})
            timings.append(result)
            self.on_progress(spec.name, 1)
        event = {"type": CELL_EVENT, "method": spec.name, "length": length, "depth": depth, "status": "ok",
                 "trials": len(trials), **counts, "accuracy": counts["exact"] / len(trials), "answers": answers}
        self.writer.add_event(event)
        return {"event": event, "timings": timings}

    def run_method(self, spec: MethodSpec) -> tuple[list[dict], list[dict]]:
        """All cells of one method; returns (cell events, records). An OOM ends the method."""
        from .results import RECORD_FIELDS
        from .stream import free_memory, percentile

        config = self.config
        cells, records = [], []
        failure, length_at, depth_at = None, config.lengths[0], config.depths[0]
        try:
            for length in config.lengths:
                length_at = length
                self.sampler.reset_peak()
                timings = []
                for depth in config.depths:
                    depth_at = depth
                    cell = self._cell(spec, length, depth)
                    cells.append(cell["event"])
                    timings.extend(cell["timings"])
                steps = [ms for t in timings for ms in t.step_ms]
                peak = self.sampler.peak_record()
                records.append(self.writer.add_record({
                    "method": spec.name, "length": length, "status": "ok", "batch_size": 1,
                    "ttft_s": statistics.median(t.ttft_s for t in timings),
                    "tpot_ms_median": statistics.median(steps) if steps else None,
                    "tpot_ms_p90": percentile(steps, 0.9) if steps else None,
                    **peak,
                    "cache_bytes": timings[-1].cache_bytes,
                    "cache_tokens": timings[-1].cache_tokens,
                }))
        except torch.OutOfMemoryError as error:
            # Keep only the message: the exception's frames hold the cache and activations alive.
            failure = str(error).splitlines()[0] if str(error) else "out of memory"
        if failure is not None:
            free_memory(self.device)
            event = {"type": CELL_EVENT, "method": spec.name, "length": length_at, "depth": depth_at,
                     "status": "oom", "trials": 0, "exact": 0, "partial": 0, "wrong": 0, "accuracy": None,
                     "message": failure}
            cells.append(self.writer.add_event(event))
            self.writer.add_event({"type": "oom", "method": spec.name, "length": length_at, "message": failure})
            record = dict.fromkeys(RECORD_FIELDS, None)
            record.update(method=spec.name, length=length_at, status="oom", batch_size=1, error=failure)
            records.append(self.writer.add_record(record))
        free_memory(self.device)
        return cells, records


def _token_id(tokenizer, token: str) -> int | None:
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if convert is None:
        return None
    token_id = convert(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    return token_id if isinstance(token_id, int) and token_id != unk else None


@dataclass
class NeedleRun:
    config: NeedleConfig
    cells: list[dict]
    records: list[dict]
    text_description: str


def run_needle(config: NeedleConfig, *, force: bool = False, notify: Notify = lambda message: None,
               progress: Callable | None = None) -> NeedleRun:
    """Check everything, load text and model, run every method, write config.out.

    The tokenizer, the --chat check and every prompt come before the model loads, so a
    mistake fails in a second; the results file is created before anything loads.
    """
    from . import models, texts
    from .results import ResultsWriter, environment

    torch_device = models.resolve_device(config.device)
    tokenizer = models.load_tokenizer(config.model)
    builder = PromptBuilder(tokenizer, chat=config.chat, model_name=config.model)
    for length in config.lengths:  # a too-short length is a mistake: say so before loading text
        size = length - builder.overhead()
        if size < MIN_HAYSTACK:
            raise ConfigError(
                f"length {length} leaves {size} haystack tokens after the needle and question "
                f"({builder.overhead()} tokens): use lengths of at least {builder.overhead() + MIN_HAYSTACK}"
            )
    writer = ResultsWriter(config.out, "needle", config.to_json(), environment(torch_device), overwrite=force)
    text = texts.load_text(config.dataset, tokenizer, config.lengths[-1])
    notify(f"text: {text.description}")
    writer.add_event({"type": "dataset", "name": text.name, "message": text.description})
    if text.fallback_note:
        notify(f"note: {text.fallback_note}")
        writer.add_event({"type": "fallback", "message": text.fallback_note})
    haystack = Haystack(text.tokens, builder)
    trials = make_trials(builder, haystack, config.lengths, config.depths, config.needles, config.seed)
    writer.add_event({"type": "prompt", "chat": config.chat, "head_tokens": len(builder.head),
                      "tail_tokens": len(builder.tail), "needle": NEEDLE, "question": QUESTION if not config.chat
                      else CHAT_QUESTION})

    loaded = models.load_model(config.model, device=config.device, dtype=config.dtype, seed=config.seed)
    notify(f"model: {loaded.name} — {loaded.source}")
    writer.add_event({"type": "model", "name": loaded.name, "pretrained": loaded.pretrained, "message": loaded.source})
    if not loaded.pretrained:
        notify("note: random weights: retrieval accuracy means nothing here (the structure of the run does)")
    cells, records = [], []
    with (progress or (lambda config: nullcontext(None)))(config) as on_progress:
        runner = NeedleRunner(config, loaded.model, builder, trials, writer, on_progress=on_progress)
        for spec in config.methods:
            method_cells, method_records = runner.run_method(spec)
            cells.extend(method_cells)
            records.extend(method_records)
            if method_records and method_records[-1]["status"] == "oom":
                notify(f"{spec.name}: out of memory at {method_records[-1]['length']} tokens — "
                       f"{method_records[-1]['error']}")
    writer.finish()
    return NeedleRun(config, cells, records, text.description)


# --- reading results --------------------------------------------------------------------


def needle_cells(doc: dict) -> list[dict]:
    """The cells of a needle results dict, the last one per (method, length, depth)."""
    latest: dict[tuple, dict] = {}
    for event in doc["events"]:
        if isinstance(event, dict) and event.get("type") == CELL_EVENT:
            try:
                key = (str(event["method"]), int(event["length"]), float(event["depth"]))
            except (KeyError, TypeError, ValueError):
                continue
            latest[key] = event
    return list(latest.values())


def mean_accuracy(cells: Sequence[dict]) -> float | None:
    """Mean accuracy over the cells that ran (OOM cells have none)."""
    values = [c["accuracy"] for c in cells if c.get("status") == "ok" and c.get("accuracy") is not None]
    return statistics.fmean(values) if values else None


__all__ = [
    "CELL_EVENT", "DEFAULT_DEPTHS", "DEFAULT_LENGTHS", "Haystack", "NeedleConfig", "NeedleRun", "NeedleRunner",
    "PromptBuilder", "SCORES", "Trial", "answer_complete", "make_trial", "make_trials", "mean_accuracy",
    "needle_cells", "parse_depths", "run_needle", "score_answer",
]

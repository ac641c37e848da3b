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
writes an "oom" record at the length it hit and the method stops there. Each method is
one stream of the stream core (one warm-up); every trial restarts its cache. A resumed
run skips the cells the file holds.
Same seed, same corpus and tokenizer: the same haystacks, needles and numbers, for every
method.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import ConfigError, NeedleConfig, parse_depths  # noqa: F401 - parse_depths: read from here too
from .events import CELL_EVENT, mean_accuracy, needle_cells
from .run import Schedule
from .spec import MethodSpec
from .stream import Harness, Stream

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


@dataclass
class _Answer:
    text: str
    ttft_s: float
    step_ms: list[float]


def done_cells(events: list[dict], spec: MethodSpec) -> set[tuple[int, float]]:
    return {(c["length"], c["depth"]) for c in needle_cells({"events": events})
            if c["method"] == spec.name and c["status"] == "ok"}


class NeedleSchedule(Schedule):
    """Every cell of every method through the model, as one stream per method."""

    random_weights_note = "random weights: retrieval accuracy means nothing here (the structure of the run does)"

    config_type = NeedleConfig
    config: NeedleConfig

    def check(self, tokenizer) -> None:
        """The --chat check and every length's room for a haystack, before any text or weights load."""
        config = self.config
        self.builder = PromptBuilder(tokenizer, chat=config.chat, model_name=config.model)
        for length in config.lengths:
            size = length - self.builder.overhead()
            if size < MIN_HAYSTACK:
                raise ConfigError(
                    f"length {length} leaves {size} haystack tokens after the needle and question "
                    f"({self.builder.overhead()} tokens): use lengths of at least {self.builder.overhead() + MIN_HAYSTACK}"
                )
        self.eos = _stop_tokens(tokenizer, config.chat)

    def prepare(self, text, writer) -> None:
        config = self.config
        self.haystack = Haystack(text.tokens, self.builder)
        self.corpus = text.tokens.unsqueeze(0)  # the warm-up's text
        self.trials = make_trials(self.builder, self.haystack, config.lengths, config.depths, config.needles,
                                  config.seed)
        writer.add_event({"type": "prompt", "chat": config.chat, "head_tokens": len(self.builder.head),
                          "tail_tokens": len(self.builder.tail), "needle": NEEDLE,
                          "question": CHAT_QUESTION if config.chat else QUESTION})

    def is_done(self, spec: MethodSpec, writer) -> bool:
        ended = any(r["method"] == spec.name and r["status"] == "oom" for r in writer.records)
        return ended or len(done_cells(writer.events, spec)) == len(self.trials)

    def crash_point(self, spec: MethodSpec, records: list[dict]) -> dict | None:
        recorded = {r["length"] for r in records if r["method"] == spec.name}
        pending = [length for length in self.config.lengths if length not in recorded]
        return {"length": pending[0], "batch_size": 1} if pending else None

    def run_method(self, harness: Harness, spec: MethodSpec) -> None:
        config, writer = self.config, harness.writer
        done = done_cells(writer.events, spec)
        todo = [trial for key, trials in self.trials.items() if key not in done for trial in trials]
        harness.progress.start(spec.name, sum(len(t.ids) + config.max_new_tokens for t in todo))
        stream = None
        for length in config.lengths:
            depths = [depth for depth in config.depths if (length, depth) not in done]
            if not depths:
                continue
            with harness.guard(spec, length=length) as point:
                point.depth = depths[0]
                if stream is None:
                    stream = harness.open(spec, self.corpus)
                harness.new_window()
                timings = []
                for depth in depths:
                    point.depth = depth
                    timings.extend(self._cell(stream, length, depth))
                    harness.flush_samples()
                steps = [ms for t in timings for ms in t.step_ms]
                writer.add_record({
                    "method": spec.name, "length": length, "status": "ok", "batch_size": 1,
                    "ttft_s": statistics.median(t.ttft_s for t in timings),
                    **harness.measurements(stream, steps),  # the cache as the last trial left it
                })
            if point.failed:
                writer.add_event({"type": CELL_EVENT, "method": spec.name, "length": length, "depth": point.depth,
                                  "status": "oom", "trials": 0, "exact": 0, "partial": 0, "wrong": 0,
                                  "accuracy": None, "message": point.failed["error"]})
                break
        harness.progress.finish()

    def _cell(self, stream: Stream, length: int, depth: float) -> list[_Answer]:
        trials = self.trials[(length, depth)]
        counts = dict.fromkeys(SCORES, 0)
        answers, timings = [], []
        for trial in trials:
            result = self.answer(stream, trial)
            score = score_answer(result.text, trial.number)
            counts[score] += 1
            answers.append({"number": trial.number, "answer": result.text, "score": score,
                            "needle_position": trial.needle_position, "offset": trial.offset})
            timings.append(result)
        stream.harness.writer.add_event({
            "type": CELL_EVENT, "method": stream.spec.name, "length": length, "depth": depth, "status": "ok",
            "trials": len(trials), **counts, "accuracy": counts["exact"] / len(trials), "answers": answers})
        return timings

    def answer(self, stream: Stream, trial: Trial) -> _Answer:
        """Prefill the context in chunks, the question in one forward, then decode greedily."""
        config, harness = self.config, stream.harness
        stream.restart()
        ids = torch.tensor([list(trial.ids)], dtype=torch.long, device=harness.device)
        for start in range(0, trial.context_tokens, config.chunk):
            stream.forward(ids[:, start : min(start + config.chunk, trial.context_tokens)], "prefill")
        logits, _ = stream.forward(ids[:, trial.context_tokens :], "prefill")
        ttft_s = stream.build_s
        token = int(logits[0, -1].argmax())
        generated: list[int] = []
        step_ms: list[float] = []
        while True:
            generated.append(token)
            if token in self.eos or len(generated) >= config.max_new_tokens:
                break
            if answer_complete(self.builder.decode(generated)):
                break
            logits, elapsed = stream.forward(ids.new_tensor([[token]]), "decode", compiled=True)
            token = int(logits[0, -1].argmax())
            step_ms.append(elapsed * 1000)
        return _Answer(self.builder.decode([t for t in generated if t not in self.eos]), ttft_s, step_ms)


def _stop_tokens(tokenizer, chat: bool) -> set[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    stops = {eos} if isinstance(eos, int) else set()
    if chat:
        for token in ("<|im_end|>", "<|eot_id|>"):
            token_id = _token_id(tokenizer, token)
            if token_id is not None:
                stops.add(token_id)
    return stops


def _token_id(tokenizer, token: str) -> int | None:
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    if convert is None:
        return None
    token_id = convert(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    return token_id if isinstance(token_id, int) and token_id != unk else None


__all__ = [
    "CELL_EVENT", "Haystack", "NeedleSchedule", "PromptBuilder", "SCORES", "Trial", "answer_complete",
    "make_trial", "make_trials", "mean_accuracy", "needle_cells", "parse_depths", "score_answer",
]

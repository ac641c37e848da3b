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

--task multikey and --task vartrack ask RULER's multi-key needle and variable tracking instead
(ruler.py says what they hide and how they score; docs/ruler.md how they depart from RULER):
the same cells, the same streams and the same cell events, each with the task's name. Their
hidden texts are placed as the needle is: the first (the asked key, the chain's first line)
exactly at the cell's depth after a sentence or line end, the others back at the nearest such
end before their own depth. multikey hides in the run's text, vartrack among RULER's noise lines.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from .config import ConfigError, NeedleConfig, parse_depths  # noqa: F401 - parse_depths: read from here too
from .events import CELL_EVENT, mean_accuracy, needle_cells
from .ruler import (
    NOISE,
    NOISE_TASKS,
    Problem,
    answer_complete,
    answer_finished,
    grade,
    make_problem,
    noise_lines,
    score_answer,
)
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
        if chat and not has_chat_template(tokenizer):
            raise ConfigError(
                f"--chat needs a tokenizer with a chat template and {model_name}'s has none: "
                "drop --chat (plain continuation prompt) or use an instruction-tuned model such as smollm2-135m"
            )
        if chat:
            self.head, self.tail = self.frame("", "\n\n" + CHAT_QUESTION, ANSWER_START)
        else:
            self.head, self.tail = self.frame("", QUESTION, "")

    def frame(self, preamble: str, question: str, answer_start: str) -> tuple[list[int], list[int]]:
        """(head, tail): the tokens before the haystack and after it. Plain: the BOS token the
        tokenizer adds, the preamble | the question and the answer's start. --chat: the user's
        message is preamble, haystack, question; the answer's start opens the assistant's turn."""
        if not self.chat:
            head = _default_prefix(self.tokenizer) + (_encode(self.tokenizer, preamble) if preamble else [])
            return head, _encode(self.tokenizer, question + answer_start)
        messages = [{"role": "user", "content": f"{preamble}{_PLACEHOLDER}{question}"}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        head, _, tail = text.partition(_PLACEHOLDER)
        return _encode(self.tokenizer, head), _encode(self.tokenizer, tail + answer_start.lstrip())

    def encode(self, text: str) -> list[int]:
        return _encode(self.tokenizer, text)

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

    def grade(self, answer: str) -> dict:
        """The answer's entry in its cell's event."""
        return {"number": self.number, "answer": answer, "score": score_answer(answer, self.number),
                "needle_position": self.needle_position, "offset": self.offset}

    def complete(self, answer: str) -> bool:
        return answer_complete(answer)


@dataclass(frozen=True)
class TaskTrial:
    """One prompt of a RULER task (ruler.py): its problem's texts hidden in a haystack of `length` tokens in all."""

    length: int
    depth: float  # percent: where the problem's first insert sits
    index: int
    problem: Problem
    offset: int  # where the haystack segment starts in the corpus tokens
    positions: tuple[int, ...]  # each insert's first token, counted from the prompt's start
    context_tokens: int  # head + haystack with the inserts: fed in prefill chunks; the tail follows
    ids: tuple[int, ...]

    def grade(self, answer: str) -> dict:
        """The answer's entry in its cell's event."""
        return {"query": self.problem.query, "expected": list(self.problem.expected), "answer": answer,
                **grade(self.problem, answer), "positions": list(self.positions), "offset": self.offset}

    def complete(self, answer: str) -> bool:
        return answer_finished(self.problem, answer)


class Haystack:
    """Corpus tokens and where the text ends a sentence or a line (a needle goes after one);
    `ends`: what such an end is (RULER's noise: a line's end only)."""

    def __init__(self, tokens: torch.Tensor | Sequence[int], builder: PromptBuilder,
                 ends: tuple[str, ...] = _BOUNDARY_ENDS):
        self.tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        boundary = {}
        for token in set(self.tokens):
            text = builder.decode([token]).rstrip(" ")
            boundary[token] = text.endswith(ends)
        self.boundary = [boundary[token] for token in self.tokens]

    def __len__(self) -> int:
        return len(self.tokens)


def place(haystack: Haystack, head: list[int], tail: list[int], inserts: Sequence[tuple[list[int], float]],
          length: int, rng: random.Random) -> tuple[list[int], list[int], int]:
    """(ids, each insert's first position, the segment's offset): head | a haystack segment with
    each insert at its depth (percent of the segment) | tail, exactly `length` tokens.

    The segment starts at a random offset, slid forward to the first start where the first
    insert follows a sentence's or a line's end; each other insert goes back to the nearest
    such end at or before its own depth (so inserts keep their order). Inserts at one place
    keep the order given."""
    size = length - len(head) - sum(len(tokens) for tokens, _ in inserts) - len(tail)
    if size < MIN_HAYSTACK:
        raise ConfigError(
            f"length {length} leaves {size} haystack tokens after the hidden text and the question "
            f"({length - size} tokens): use lengths of at least {length - size + MIN_HAYSTACK}"
        )
    if len(haystack) < size:
        raise ConfigError(
            f"the text has only {len(haystack)} tokens but a {length}-token prompt needs {size}: "
            "use shorter --lengths or a longer --dataset"
        )
    splits = [round(depth / 100 * size) for _, depth in inserts]
    last_start = len(haystack) - size
    offset = rng.randint(0, last_start)
    if splits[0] > 0:
        # Slide the segment forward (wrapping) to the first start whose text before the
        # first insert ends a sentence or a line; keep the random start when there is none.
        for step in range(last_start + 1):
            start = (offset + step) % (last_start + 1)
            if haystack.boundary[start + splits[0] - 1]:
                offset = start
                break
    for i in range(1, len(splits)):
        while splits[i] > 0 and not haystack.boundary[offset + splits[i] - 1]:
            splits[i] -= 1
    segment = haystack.tokens[offset : offset + size]
    ids, positions, done = list(head), [0] * len(inserts), 0
    for i in sorted(range(len(inserts)), key=lambda i: (splits[i], i)):
        ids += segment[done : splits[i]]
        positions[i] = len(ids)
        ids += inserts[i][0]
        done = splits[i]
    ids += segment[done:] + tail
    assert len(ids) == length, (len(ids), length)
    return ids, positions, offset


def make_trial(builder: PromptBuilder, haystack: Haystack, length: int, depth: float, index: int,
               seed: int) -> Trial:
    """The prompt for trial `index` of cell (length, depth): the same for the same arguments."""
    rng = random.Random(f"kvstress-needle:{seed}:{length}:{depth}:{index}")
    number = str(rng.randint(10000, 99999))
    needle = builder.needle(number)
    ids, (position,), offset = place(haystack, builder.head, builder.tail, [(needle, depth)], length, rng)
    return Trial(length=length, depth=depth, index=index, number=number, offset=offset,
                 needle_position=position, needle_tokens=len(needle),
                 context_tokens=length - len(builder.tail), ids=tuple(ids))


def make_task_trial(builder: PromptBuilder, haystack: Haystack, task: str, length: int, depth: float, index: int,
                    seed: int) -> TaskTrial:
    """The prompt for trial `index` of a RULER task's cell (length, depth): the same for the same arguments."""
    rng = random.Random(f"kvstress-{task}:{seed}:{length}:{depth}:{index}")
    problem = make_problem(task, rng, depth)
    head, tail = builder.frame(problem.preamble, problem.question, problem.answer_start)
    inserts = [(builder.encode(text), at) for text, at in zip(problem.inserts, problem.depths)]
    ids, positions, offset = place(haystack, head, tail, inserts, length, rng)
    return TaskTrial(length=length, depth=depth, index=index, problem=problem, offset=offset,
                     positions=tuple(positions), context_tokens=length - len(tail), ids=tuple(ids))


def make_trials(builder: PromptBuilder, haystack: Haystack, lengths: Sequence[int], depths: Sequence[float],
                needles: int, seed: int, task: str = "needle") -> dict[tuple[int, float], list[Trial | TaskTrial]]:
    """Every cell's trials, built (and checked) before any model runs."""
    def trial(length: int, depth: float, i: int) -> Trial | TaskTrial:
        if task == "needle":
            return make_trial(builder, haystack, length, depth, i, seed)
        return make_task_trial(builder, haystack, task, length, depth, i, seed)

    return {(length, depth): [trial(length, depth, i) for i in range(needles)] for length in lengths for depth in depths}


def task_haystack(builder: PromptBuilder, task: str, text_tokens, tokens: int) -> Haystack:
    """Where `task` hides its texts: the run's text, or (vartrack) RULER's noise lines, `tokens` of them at least."""
    if task not in NOISE_TASKS:
        return Haystack(text_tokens, builder)
    per_line = len(builder.encode(NOISE + "\n"))
    return Haystack(builder.encode(noise_lines(tokens, per_line)), builder, ends=("\n",))


# --- running ----------------------------------------------------------------------------


@dataclass
class _Answer:
    text: str
    ttft_s: float
    step_ms: list[float]


def done_cells(events: list[dict], spec: MethodSpec, task: str = "needle") -> set[tuple[int, float]]:
    """The (length, depth) cells of `spec` on `task` that ran (a cell from before --task is the needle's)."""
    return {(c["length"], c["depth"]) for c in needle_cells({"events": events})
            if c["method"] == spec.name and c.get("task", "needle") == task and c["status"] == "ok"}


class NeedleSchedule(Schedule):
    """Every cell of every method through the model, as one stream per method."""

    random_weights_note = "random weights: retrieval accuracy means nothing here (the structure of the run does)"

    config_type = NeedleConfig
    config: NeedleConfig

    def check(self, tokenizer) -> None:
        """The --chat check and every length's room for a haystack, before any text or weights load."""
        config = self.config
        self.builder = PromptBuilder(tokenizer, chat=config.chat, model_name=config.model)
        overhead = self.builder.overhead() if config.task == "needle" else _task_overhead(self.builder, config.task)
        for length in config.lengths:
            size = length - overhead
            if size < MIN_HAYSTACK:
                raise ConfigError(
                    f"length {length} leaves {size} haystack tokens after the hidden text and the question "
                    f"({overhead} tokens): use lengths of at least {overhead + MIN_HAYSTACK}"
                )
        self.eos = _stop_tokens(tokenizer, config.chat)

    def prepare(self, text, writer) -> None:
        config = self.config
        self.haystack = task_haystack(self.builder, config.task, text.tokens, config.lengths[-1])
        self.corpus = text.tokens.unsqueeze(0)  # the warm-up's text
        self.trials = make_trials(self.builder, self.haystack, config.lengths, config.depths, config.needles,
                                  config.seed, config.task)
        if config.task == "needle":
            writer.add_event({"type": "prompt", "task": config.task, "chat": config.chat,
                              "head_tokens": len(self.builder.head), "tail_tokens": len(self.builder.tail),
                              "needle": NEEDLE, "question": CHAT_QUESTION if config.chat else QUESTION})
        else:  # the texts vary by trial: the first one's, and where the haystack comes from
            first = next(iter(self.trials.values()))[0]
            writer.add_event({"type": "prompt", "task": config.task, "chat": config.chat,
                              "haystack": "RULER's noise lines" if config.task in NOISE_TASKS else "the run's text",
                              "example": asdict(first.problem)})

    def is_done(self, spec: MethodSpec, writer) -> bool:
        ended = any(r["method"] == spec.name and r["status"] == "oom" for r in writer.records)
        return ended or len(done_cells(writer.events, spec, self.config.task)) == len(self.trials)

    def crash_point(self, spec: MethodSpec, records: list[dict]) -> dict | None:
        recorded = {r["length"] for r in records if r["method"] == spec.name}
        pending = [length for length in self.config.lengths if length not in recorded]
        return {"length": pending[0], "batch_size": 1} if pending else None

    def run_method(self, harness: Harness, spec: MethodSpec) -> None:
        config, writer = self.config, harness.writer
        done = done_cells(writer.events, spec, config.task)
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
                writer.add_event({"type": CELL_EVENT, "method": spec.name, "task": config.task, "length": length,
                                  "depth": point.depth,
                                  "status": point.failed["status"], "trials": 0, "exact": 0, "partial": 0, "wrong": 0,
                                  "accuracy": None, "message": point.failed["error"]})
                break
        harness.progress.finish()

    def _cell(self, stream: Stream, length: int, depth: float) -> list[_Answer]:
        trials = self.trials[(length, depth)]
        counts = dict.fromkeys(SCORES, 0)
        answers, timings = [], []
        for trial in trials:
            result = self.answer(stream, trial)
            entry = trial.grade(result.text)
            counts[entry["score"]] += 1
            answers.append(entry)
            timings.append(result)
        # vartrack's answers are also scored as RULER scores them: the share of the names found.
        recall = {"recall": statistics.fmean(a["recall"] for a in answers)} if "recall" in answers[0] else {}
        stream.harness.writer.add_event({
            "type": CELL_EVENT, "method": stream.spec.name, "task": self.config.task, "length": length, "depth": depth,
            "status": "ok", "trials": len(trials), **counts, "accuracy": counts["exact"] / len(trials), **recall,
            "answers": answers})
        return timings

    def answer(self, stream: Stream, trial: Trial | TaskTrial) -> _Answer:
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
            if trial.complete(self.builder.decode(generated)):
                break
            logits, elapsed = stream.forward(ids.new_tensor([[token]]), "decode", compiled=True)
            token = int(logits[0, -1].argmax())
            step_ms.append(elapsed * 1000)
        return _Answer(self.builder.decode([t for t in generated if t not in self.eos]), ttft_s, step_ms)


def _task_overhead(builder: PromptBuilder, task: str) -> int:
    """Prompt tokens that are not haystack in a RULER task's prompt (one drawn problem: key names vary a little)."""
    problem = make_problem(task, random.Random(0), 0.0)
    head, tail = builder.frame(problem.preamble, problem.question, problem.answer_start)
    return len(head) + len(tail) + sum(len(builder.encode(text)) for text in problem.inserts)


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
    "CELL_EVENT", "Haystack", "NeedleSchedule", "PromptBuilder", "SCORES", "TaskTrial", "Trial", "answer_complete",
    "make_task_trial", "make_trial", "make_trials", "mean_accuracy", "needle_cells", "parse_depths", "place",
    "score_answer", "task_haystack",
]

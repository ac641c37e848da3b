"""The tasks `kvstress needle --task` asks: what is hidden, the question, and how an answer scores.

    kvstress needle --task multikey -m baseline,streaming_4_128 --lengths 1k,2k --depths 0,50,100
    kvstress needle --task vartrack -m baseline,streaming_4_128 --lengths 1k,2k --depths 0,50,100

needle    kvstress's own: one "The magic number is 73914." (needle.py builds it). Scored on the
          answer's first number: exact, partial or wrong (score_answer).
multikey  RULER's niah_multikey_1: four needles "One of the special magic numbers for {key} is:
          {value}." hidden in the run's text, keys adjective-noun words, values 7-digit numbers; the
          question asks for one key. The asked key sits at the cell's depth, the other three at
          depths drawn from RULER's 40-point grid. Scored like the needle on the answer's first
          number, against the asked key's value; an answer that gives another key's value is marked
          "distractor" (the cache kept the wrong needle).
vartrack  RULER's vt: a one-shot example, then RULER's noise lines ("The grass is green. ...")
          with one chain of five assignments hidden among them ("VAR QXKZT = 40213", then four
          "VAR B = VAR A" hops); the question asks for every variable that holds the value. The
          chain's first line sits at the cell's depth, the four hops at depths drawn between it and
          the end, in order. recall = the share of the five names the answer contains (RULER's
          string_match_all: case-insensitive substrings); exact when it holds all five, partial when
          some, wrong when none.

Both follow RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?"; github.com/NVIDIA/RULER: scripts/data/synthetic/niah.py, variable_tracking.py and
constants.py for the texts, scripts/synthetic.yaml for the settings, scripts/eval/synthetic/constants.py
for the scoring); docs/ruler.md lists where kvstress departs from it. This module knows no tokenizer:
a Problem says what to hide where and what to ask; needle.py places it in a prompt of exactly the
asked number of tokens and runs it. Everything is drawn from the `random.Random` it is given, so a
seed gives the same problems.
"""

from __future__ import annotations

import math
import random
import re
import string
from dataclasses import dataclass

TASKS = ("needle", "multikey", "vartrack")
# Tokens an answer may take, by task (--max-new-tokens' default). vartrack's is RULER's
# tokens_to_generate; the numbers' answers stop at the first number (answer_complete).
ANSWER_TOKENS = {"needle": 24, "multikey": 24, "vartrack": 30}
# Hidden among RULER's noise lines rather than in the run's text (RULER's vt default, type_haystack noise).
NOISE_TASKS = ("vartrack",)
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# --- multikey: RULER's niah template with one query and one value, where niah.py turns
# "Some ... are" into "A ... is" and "numbers" into "number" (the needle keeps "numbers").
MULTIKEY_PREAMBLE = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                     "I will quiz you about the number afterwards.\n")
MULTIKEY_NEEDLE = " One of the special magic numbers for {key} is: {value}."
MULTIKEY_QUESTION = "\nWhat is the special magic number for {key} mentioned in the provided text?"
MULTIKEY_ANSWER = " The special magic number for {key} mentioned in the provided text is"
MULTIKEY_KEYS = 4  # niah_multikey_1: num_needle_k 4
# niah.py's insertion depths: np.round(np.linspace(0, 100, 40)) (no value falls on a half).
RULER_DEPTHS = tuple(sorted({round(100 * i / 39) for i in range(40)}))
# Keys are "adjective-noun" as RULER's (from the wonderwords lists, which kvstress does not ship).
_ADJECTIVES = ("amber", "ancient", "bitter", "brave", "bright", "calm", "clever", "crimson", "curious", "distant",
               "eager", "fancy", "fierce", "gentle", "golden", "hidden", "hollow", "humble", "icy", "jolly",
               "lively", "lucky", "mellow", "misty", "noble", "quiet", "rapid", "rusty", "silent", "silver",
               "steady", "swift", "tender", "velvet", "wild", "wooden")
_NOUNS = ("anchor", "badger", "banner", "beacon", "bridge", "candle", "canyon", "castle", "cellar", "comet",
          "compass", "falcon", "garden", "harbor", "helmet", "island", "lantern", "meadow", "mirror", "orchard",
          "otter", "pebble", "pepper", "quarry", "raven", "river", "saddle", "spindle", "thistle", "tower",
          "valley", "walnut", "willow", "window")
KEYS = tuple(f"{adjective}-{noun}" for adjective in _ADJECTIVES for noun in _NOUNS)

# --- vartrack: RULER's constants.py texts, and variable_tracking.py's chain.
VARTRACK_PREAMBLE = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VARTRACK_QUESTION = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
VARTRACK_ANSWER = (" Answer: According to the chain(s) of variable assignment in the text above, {count} variables "
                   "are assigned the value {value}, they are: ")
VARTRACK_HOPS = 4  # vt: num_chains 1, num_hops 4: five names
# The one-shot example: RULER's is as long as fits in 500 tokens (about twenty noise lines); five
# lines (the fewest its chain of five fits among) keep it to about 200 tokens, so that 1k prompts
# still have a haystack.
EXAMPLE_NOISE_LINES = 5


@dataclass(frozen=True)
class Problem:
    """One prompt's task: the texts to hide and where, the question, and the answer expected."""

    task: str
    preamble: str  # the prompt's start, before the haystack (after the BOS token or the chat template's start)
    inserts: tuple[str, ...]  # hidden in the haystack, each where its depth says; the first at the cell's depth
    depths: tuple[float, ...]  # percent of the haystack, one per insert
    question: str  # after the haystack
    answer_start: str  # what the model's answer continues
    query: str  # the key (multikey) or the value (vartrack) asked about
    expected: tuple[str, ...]  # the asked key's value (multikey); every name bound to the value (vartrack)
    others: tuple[str, ...] = ()  # multikey: the values of the keys not asked about


def make_problem(task: str, rng: random.Random, depth: float) -> Problem:
    """The problem of one trial of `task` (multikey or vartrack) at `depth` (percent of the haystack), drawn from `rng`."""
    return {"multikey": _multikey, "vartrack": _vartrack}[task](rng, depth)


def _multikey(rng: random.Random, depth: float) -> Problem:
    keys = rng.sample(KEYS, MULTIKEY_KEYS)
    values: list[str] = []
    while len(values) < MULTIKEY_KEYS:  # distinct: an answer names one key's value only
        value = str(rng.randint(10**6, 10**7 - 1))  # niah.py's numbers: 7 digits
        if value not in values:
            values.append(value)
    depths = (depth, *(float(d) for d in rng.sample(RULER_DEPTHS, MULTIKEY_KEYS - 1)))
    key = keys[0]
    return Problem(task="multikey", preamble=MULTIKEY_PREAMBLE,
                   inserts=tuple(MULTIKEY_NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)),
                   depths=depths, question=MULTIKEY_QUESTION.format(key=key),
                   answer_start=MULTIKEY_ANSWER.format(key=key), query=key, expected=(values[0],),
                   others=tuple(values[1:]))


def _names(rng: random.Random, count: int, letters: int) -> list[str]:
    """Distinct variable names of `letters` capitals, as variable_tracking.py draws them."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    return names


def _chain(names: list[str], value: str) -> list[str]:
    """variable_tracking.py's chain: the value, then each name set to the one before (its trailing space kept)."""
    return [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]


def _example(rng: random.Random) -> str:
    """RULER's one-shot example, answer included: three-letter names, the chain among a few noise lines."""
    names = _names(rng, VARTRACK_HOPS + 1, 3)
    value = str(rng.randint(10000, 99998))
    lines = [NOISE] * EXAMPLE_NOISE_LINES
    chain = _chain(names, value)
    for shift, position in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
        lines.insert(position + shift, chain[shift])
    text = (VARTRACK_PREAMBLE + "\n".join(lines) + VARTRACK_QUESTION.format(value=value)
            + VARTRACK_ANSWER.format(count=len(names), value=value))
    return text + " " + " ".join(names) + "\n"


def _vartrack(rng: random.Random, depth: float) -> Problem:
    example = _example(rng)
    names = _names(rng, VARTRACK_HOPS + 1, 5)
    value = str(rng.randint(10000, 99998))  # np.random.randint(10000, 99999): the upper bound excluded
    hops = sorted(rng.uniform(depth, 100.0) for _ in range(VARTRACK_HOPS))
    return Problem(task="vartrack", preamble=example + "\n" + VARTRACK_PREAMBLE,
                   inserts=tuple(line + "\n" for line in _chain(names, value)), depths=(depth, *hops),
                   question=VARTRACK_QUESTION.format(value=value),
                   answer_start=VARTRACK_ANSWER.format(count=len(names), value=value), query=value,
                   expected=tuple(names))


def noise_lines(tokens: int, tokens_per_line: int) -> str:
    """RULER's noise, one line after another, at least `tokens` tokens of it."""
    return (NOISE + "\n") * (tokens // max(tokens_per_line, 1) + 2)


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


def grade(problem: Problem, answer: str) -> dict:
    """The answer's score ("exact", "partial" or "wrong") and what else tells about it:
    multikey "distractor" (it gave another key's value), vartrack "recall" (RULER's score)."""
    if problem.task == "multikey":
        numbers = answer_numbers(answer)
        return {"score": score_answer(answer, problem.expected[0]),
                "distractor": bool(numbers) and numbers[0] in problem.others}
    found = sum(name.lower() in answer.lower() for name in problem.expected)
    recall = found / len(problem.expected)
    return {"score": "exact" if recall == 1 else "partial" if found else "wrong", "recall": recall}


def answer_finished(problem: Problem, answer: str) -> bool:
    """Whether decoding can stop: after the first number (multikey), at the end of the answer's
    line (vartrack: where the one-shot example's answer ends)."""
    if problem.task == "multikey":
        return answer_complete(answer)
    return "\n" in answer.lstrip()

"""Small runs of each measuring command on the tiny model, shared by the tests that drive
every command (test_capabilities.py, test_signals.py): long enough (one thread) to be
stopped mid-way. A repeated option's last value wins, so a test shortens them by appending.
And `filler_text`, the haystack of the needle tests."""

import random

METHODS = ["-m", "baseline", "-m", "streaming_4_48", "-m", "h2o_4_6_48"]
COMMANDS = {
    "sweep": ["sweep", "--lengths", "128,256,384,512,640,768", "--chunk", "32", "--decode-steps", "4"],
    "ppl": ["ppl", "--tokens", "768", "--buckets", "128,256,384,512,640", "--chunk", "1"],
    "needle": ["needle", "--lengths", "128,192,256,320", "--depths", "0,50,100", "--needles", "2",
               "--max-new-tokens", "3", "--chunk", "32"],
    "batch": ["batch", "--length", "128", "--batch-sizes", "1,2,3,4,5,6", "--chunk", "32", "--decode-steps", "4"],
}


def filler_text(sentences: int, seed: int = 1) -> str:
    """Sentences of common words from `seed`: a haystack with nothing in it to find."""
    rng = random.Random(seed)
    words = "the of and a to in is was it that he she they we you for on with as at by this from but not".split()
    return " ".join(
        " ".join(rng.choice(words) for _ in range(rng.randint(5, 14))).capitalize() + "."
        for _ in range(sentences)
    )

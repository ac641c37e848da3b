"""Which parts of the needle does H2O still hold when the question comes?

Builds the same prompts as `kvstress needle` (seed 0, bundled SmolLM2, Shakespeare),
feeds each context through h2o_4_32_256 as the needle run does (prefill chunks of 512,
then the question), and counts, over every (layer, KV head), how many still hold at
least one of the needle's five digits, all five, and at least one token of
"\\nThe magic number is".

    python benchmarks/needle_kept.py                       # 2k, depths 25/50/75, 3 needles each
"""

from __future__ import annotations

import argparse

import torch

from kvstress import make_cache, texts
from kvstress.models import cache_argument, load_model, load_tokenizer
from kvstress.needle import Haystack, PromptBuilder, make_trial


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="h2o_4_32_256")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--depths", default="25,50,75")
    parser.add_argument("--needles", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=512)
    args = parser.parse_args()

    tokenizer = load_tokenizer("smollm2-135m")
    builder = PromptBuilder(tokenizer, model_name="smollm2-135m")
    haystack = Haystack(texts.load_text("shakespeare", tokenizer, args.length).tokens, builder)
    model = load_model("smollm2-135m", device="cpu", dtype="auto").model
    argument = cache_argument(model)
    words = len(builder.needle("00000")) - 7  # "\nThe magic number is " before the digits, ".\n" after
    print(f"{args.method}, {args.length} tokens: (layer, KV head) rows holding needle tokens when the question comes")
    for depth in (float(d) for d in args.depths.split(",")):
        for index in range(args.needles):
            trial = make_trial(builder, haystack, args.length, depth, index, seed=0)
            sentence = set(range(trial.needle_position, trial.needle_position + words))
            digits = set(range(trial.needle_position + words, trial.needle_position + words + 5))
            cache = make_cache(args.method, model)
            with torch.no_grad():
                for start in range(0, trial.context_tokens, args.chunk):
                    end = min(start + args.chunk, trial.context_tokens)
                    model(input_ids=torch.tensor([trial.ids[start:end]]), use_cache=True, logits_to_keep=1,
                          **{argument: cache})
                model(input_ids=torch.tensor([trial.ids[trial.context_tokens:]]), use_cache=True, logits_to_keep=1,
                      **{argument: cache})
            rows = [set(row) for layer in range(len(cache.layers)) for row in cache.kept_positions(layer)[0].tolist()]
            some = sum(bool(row & digits) for row in rows)
            every = sum(digits <= row for row in rows)
            said = sum(bool(row & sentence) for row in rows)
            print(f"depth {depth:>5.1f}% needle {index} ({trial.number}): some digit {some}/{len(rows)}, "
                  f"all five digits {every}/{len(rows)}, some of the sentence {said}/{len(rows)}")


if __name__ == "__main__":
    main()

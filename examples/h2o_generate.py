"""Generate text with an H2O cache: the cache is a plain transformers cache.

    python examples/h2o_generate.py                   # bundled SmolLM2-135M, CPU is fine
    python examples/h2o_generate.py --model HF_ID     # any Llama-family model

The prompt is longer than the cache, so H2O evicts while it reads the prompt and
while it generates; the cache ends holding exactly `capacity` tokens per layer.
The cache is passed as `cache=` on transformers 5.24 (which deprecates
`past_key_values=`) and as `past_key_values=` on 5.17: `cache_argument` picks the name.
"""

import argparse

import torch

from kvstress import make_cache
from kvstress.models import cache_argument, load_model
from kvstress.texts import load_text

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--spec", default="h2o_4_32_256")
parser.add_argument("--prompt-tokens", type=int, default=1000)
args = parser.parse_args()

loaded = load_model(args.model)
model, tokenizer = loaded.model, loaded.tokenizer
prompt = load_text("shakespeare", tokenizer, args.prompt_tokens).tokens[: args.prompt_tokens]
input_ids = prompt.unsqueeze(0).to(model.device)

cache = make_cache(args.spec, model)  # or positions="shifted", lazy=16
with torch.no_grad():
    output = model.generate(
        input_ids, **{cache_argument(model): cache}, max_new_tokens=40, do_sample=False
    )

print(tokenizer.decode(output[0, input_ids.shape[1] :].tolist()))
print(f"\n{cache}: {cache.layers[0].seen} tokens seen, {cache.layers[0].kept} kept per layer")
print("positions kept by layer 0, head 0:", cache.kept_positions(0)[0, 0].tolist()[:12], "...")

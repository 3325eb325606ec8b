"""Generation speed: tokens/s of ``sigma-moe generate``'s loop (key/value cache or XL memory) against
recomputing the whole window for every new token (what a model without a decoding state must do).

    .venv/bin/python benchmarks/bench_generate.py                                  # default config, CPU
    .venv/bin/python benchmarks/bench_generate.py --config configs/tiny.yaml --new-tokens 60
    .venv/bin/python benchmarks/bench_generate.py --config configs/tiny-xl.yaml
    python benchmarks/bench_generate.py --device cuda                                # a GPU

The model is the config's ``model`` section (``--set`` overrides as on the CLI) with its initial
weights (speed does not depend on them; ``--checkpoint`` loads a checkpoint or export instead). Both
loops decode greedily from the same prompt of ``--prompt-tokens`` random tokens and must produce the
same tokens while the window fits the context (checked). Each loop runs ``--repeats`` times after a
warm-up run; the median is printed. The recompute loop feeds the last ``context`` tokens each step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sigma_moe.launch.config import config_to_dict, load_config
from sigma_moe.launch.generate import Sampling, generate
from sigma_moe.layers import TransformerLM


@torch.inference_mode()
def recompute(model: TransformerLM, prompt: list[int], new_tokens: int) -> list[int]:
    ids, device = list(prompt), model.embedding.weight.device
    for _ in range(new_tokens):
        window = torch.tensor([ids[-model.cfg.context :]], device=device)
        ids.append(int(model(window).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def timed(fn, repeats: int) -> tuple[float, list[int]]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--checkpoint", default=None, help="load these weights (a checkpoint or an export)")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = TransformerLM(cfg.model).eval()
    if args.checkpoint:
        from sigma_moe.launch.checkpoint.weights import load_model_weights, resolve_weights

        load_model_weights(model, resolve_weights(args.checkpoint), model_config=config_to_dict(cfg.model))
    prompt = torch.randint(0, cfg.model.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1))
    prompt = prompt.tolist()
    greedy = Sampling(temperature=0)
    cached_s, cached = timed(
        lambda: generate(model, prompt, max_new_tokens=args.new_tokens, sampling=greedy, seed=0).new_ids, args.repeats
    )
    full_s, full = timed(lambda: recompute(model, prompt, args.new_tokens), args.repeats)
    fits = cfg.model.context - args.prompt_tokens  # beyond, the causal cache restarts from half a context
    same = cached[:fits] == full[:fits]
    m = cfg.model
    print(
        f"{args.config}: d_model {m.d_model}, {m.n_layers} layers, context {m.context}, ff {m.ff.kind}, "
        f"attention {m.attention}; {args.new_tokens} new tokens after {args.prompt_tokens}, {args.device}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"decoding state: {args.new_tokens / cached_s:8.1f} tokens/s")
    print(f"recompute:      {args.new_tokens / full_s:8.1f} tokens/s")
    print(f"speed-up: {full_s / cached_s:.2f}x; same tokens while the window fits the context: {same}")
    if not same:
        raise SystemExit("the two loops chose different tokens within the context")


if __name__ == "__main__":
    main()

"""``sigma-moe generate``: sample a continuation of a prompt from a checkpoint or an export, in one
process (CPU or GPU), and say how fast it went.

The prompt is decoded once (prefill), then one token per step with the model's decoding state
(``TransformerLM.decode``: a key/value cache for attention "causal", the segment memory for "xl").
A prompt longer than the context keeps its last ``context`` tokens (with a warning). A causal model
sees at most ``context`` tokens: when its cache is full, decoding restarts from the last half of the
context (one prefill of context/2 tokens every context/2 new tokens); the XL memory slides by itself.

Sampling, per step: logits / temperature (0: greedy), then top-k (0: off), then top-p (nucleus: the
smallest set of most likely tokens whose probability reaches p; 1: off), from a generator seeded with
``--seed``. Token ids the tokenizer cannot decode (a BPE that found fewer pieces than the model's
vocabulary) are never sampled.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import torch

from sigma_moe.config_check import ConfigError
from sigma_moe.launch.config import RunConfig
from sigma_moe.layers.transformer import TransformerLM

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if not self.temperature >= 0:
            problems.append(f"--temperature {self.temperature}: must be >= 0 (0: greedy)")
        if self.top_k < 0:
            problems.append(f"--top-k {self.top_k}: must be >= 0 (0: off)")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p {self.top_p}: must be in (0, 1] (1: off)")
        if problems:
            raise ConfigError("; ".join(problems))


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (see the module docstring)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens more likely than this one
        sorted_logits = sorted_logits.masked_fill(before >= sampling.top_p, float("-inf"))  # keeps the first
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@dataclass
class Generation:
    prompt_ids: list[int]  # the prompt as the model saw it (cut to the context)
    new_ids: list[int]
    prefill_s: float  # the prompt's forward
    decode_s: float  # sampling and decoding the new tokens

    @property
    def tokens_per_s(self) -> float:
        return len(self.new_ids) / self.decode_s if self.decode_s > 0 else float("inf")


@torch.inference_mode()
def generate(
    model: TransformerLM,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    sampling: Sampling,
    seed: int,
    vocab_limit: int | None = None,
) -> Generation:
    """Continue ``prompt_ids`` (at most the model's context; at least one) by ``max_new_tokens`` tokens;
    ids >= ``vocab_limit`` are never sampled."""
    context = model.cfg.context
    if not 0 < len(prompt_ids) <= context:
        raise ValueError(f"the prompt must have 1 to {context} tokens, got {len(prompt_ids)}")
    device = model.embedding.weight.device
    generator = torch.Generator().manual_seed(seed)
    model.eval()

    def step(tokens: list[int], state) -> torch.Tensor:
        logits = model.decode(torch.tensor([tokens], device=device), state)[:, -1]
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float("-inf")
        return logits

    start = time.perf_counter()
    state = model.start_decoding(1)
    logits = step(prompt_ids, state)
    prefilled = time.perf_counter()
    ids = list(prompt_ids)
    for i in range(max_new_tokens):
        ids.append(int(next_token(logits, sampling, generator)))  # NOTE: host sync, one per token
        if i + 1 == max_new_tokens:
            break
        if state.room == 0:  # causal cache full: restart from the last half of the context
            state = model.start_decoding(1)
            logits = step(ids[-max(1, context // 2) :], state)
        else:
            logits = step(ids[-1:], state)
    return Generation(list(prompt_ids), ids[len(prompt_ids) :], prefilled - start, time.perf_counter() - prefilled)


def choose_device(name: str | None) -> torch.device:
    """``--device``: the GPU torch sees by default, else the CPU; a device torch lacks is a ConfigError."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: torch sees no GPU here; use --device cpu")
    return device


def generate_main(cfg: RunConfig | None, args) -> None:
    """The command: load, encode the prompt (cut to the context), generate, print the text to stdout
    and the speed to stderr."""
    from sigma_moe.launch.export import load_for_inference

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    device = choose_device(args.device)
    model, tokenizer = load_for_inference(cfg, args.checkpoint, device)
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ConfigError("--prompt is empty; give at least one character to continue")
    context = model.cfg.context
    if len(prompt_ids) > context:
        logger.warning(
            "the prompt has %d tokens, more than the model's context (%d): only its last %d are used",
            len(prompt_ids),
            context,
            context,
        )
        prompt_ids = prompt_ids[-context:]
    out = generate(
        model,
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=args.seed,
        vocab_limit=tokenizer.vocab_size,
    )
    print(tokenizer.decode(out.prompt_ids + out.new_ids), flush=True)
    print(
        f"{len(out.new_ids)} new tokens in {out.decode_s:.2f} s: {out.tokens_per_s:.1f} tokens/s "
        f"(prompt: {len(out.prompt_ids)} tokens in {out.prefill_s:.3f} s; {device.type})",
        file=sys.stderr,
        flush=True,
    )

"""A load generator for any OpenAI-compatible server (MILI, `vllm serve`, `llama-server`, `max serve`): streamed
/v1/completions at a fixed concurrency or at a Poisson request rate, with TTFT, TPOT, ITL and end-to-end latency
percentiles, throughput and failed requests.

    python -m benchmarks.serving_client --base-url http://127.0.0.1:8000 --model NAME --tokenizer DIR
        [--dataset random|shared-prefix] [--num-prompts 64] [--concurrency 16 | --request-rate 2.0] [--seed 0]

Definitions are vLLM's (`vllm bench serve`), so the numbers compare with it: TTFT from sending the request to the
first streamed chunk with text; ITL the gaps between successive chunks with text; TPOT per request
(e2e - TTFT) / (output tokens - 1), output tokens from the usage the server reports at the end of the stream;
throughput = output tokens of all successful requests / the run's wall time. One difference from vLLM's: it
counts every chunk that carries a choice, empty text included, so a server that ends with an empty chunk holding
only finish_reason gets an extra near-zero gap; here such chunks are not tokens. Requests ask for greedy tokens with
EOS ignored, so every engine generates exactly the tokens asked for. A request fails on a transport error, a
non-200 status, an error event, or fewer output tokens than asked; failures are counted and never retried.

Prompts are text made of words that the Qwen3 tokenizer maps to one token each (" apple" -> 1 token), so a
prompt of N words is N tokens for every engine that uses the checkpoint's tokenizer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tokenizers import Tokenizer


@dataclass(frozen=True)
class Request:
    prompt: str
    prompt_tokens: int
    max_tokens: int


@dataclass
class Outcome:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None


class WordVocabulary:
    """Words that are one token each, and stay one token each when written one after another: a space and 3-10
    lowercase letters (the pre-tokenizer splits text before each space, so each word is encoded alone)."""

    def __init__(self, tokenizer_dir: Path):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        words = []
        for token_id in range(self.tokenizer.get_vocab_size()):
            text = self.tokenizer.decode([token_id])
            if re.fullmatch(r" [a-z]{3,10}", text) and self.tokenizer.encode(text, add_special_tokens=False).ids == [token_id]:
                words.append(text)
        if len(words) < 1000:
            raise ValueError(f"{tokenizer_dir}: only {len(words)} one-token words; is this a Qwen3 tokenizer?")
        self.words = words

    def text(self, rng: random.Random, tokens: int) -> str:
        return "".join(rng.choice(self.words) for _ in range(tokens))

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)


def random_dataset(vocab: WordVocabulary, num_prompts: int, prompt_range: tuple[int, int],
                   output_range: tuple[int, int], seed: int) -> list[Request]:
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        prompt = vocab.text(rng, rng.randint(*prompt_range))
        requests.append(Request(prompt, vocab.count(prompt), rng.randint(*output_range)))
    return requests


def shared_prefix_dataset(vocab: WordVocabulary, num_prompts: int, num_prefixes: int, prefix_tokens: int,
                          question_tokens: int, output_tokens: int, seed: int) -> list[Request]:
    """`num_prefixes` long system prompts, each shared by an equal share of the requests, every request with a
    question of its own after it; requests of different prefixes interleaved, in a seeded order."""
    rng = random.Random(seed)
    prefixes = [vocab.text(rng, prefix_tokens) for _ in range(num_prefixes)]
    requests = []
    for i in range(num_prompts):
        prompt = prefixes[i % num_prefixes] + vocab.text(rng, question_tokens)
        requests.append(Request(prompt, vocab.count(prompt), output_tokens))
    rng.shuffle(requests)
    return requests


async def send(client: httpx.AsyncClient, base_url: str, model: str, request: Request) -> Outcome:
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    outcome = Outcome(ok=False, prompt_tokens=request.prompt_tokens)
    chunks_with_text = 0
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{base_url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    outcome.error = str(chunk["error"])[:300]
                    return outcome
                now = time.perf_counter()
                if any(choice.get("text") for choice in chunk.get("choices") or []):
                    if chunks_with_text == 0:
                        outcome.ttft_s = now - start
                    else:
                        outcome.itl_s.append(now - last)
                    chunks_with_text += 1
                    last = now
                if chunk.get("usage"):
                    outcome.output_tokens = int(chunk["usage"]["completion_tokens"])
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, ValueError) as error:
        outcome.error = f"{type(error).__name__}: {error}"[:300]
        return outcome
    outcome.e2e_s = time.perf_counter() - start
    if outcome.output_tokens == 0:  # a server that sends no usage: count chunks (one token each when streaming)
        outcome.output_tokens = chunks_with_text
    if outcome.output_tokens < request.max_tokens:
        outcome.error = f"{outcome.output_tokens} of {request.max_tokens} tokens"
        return outcome
    outcome.ok = True
    return outcome


async def run_load(base_url: str, model: str, requests: list[Request], concurrency: int | None,
                   request_rate: float | None, seed: int = 0,
                   transport: httpx.AsyncBaseTransport | None = None) -> tuple[list[Outcome], float]:
    """Sends every request, either `concurrency` at a time, or arriving as a Poisson process of `request_rate`
    requests a second (exponential gaps, seeded) with no cap on how many are in flight. (`transport`: tests.)"""
    limits = httpx.Limits(max_connections=concurrency or len(requests), max_keepalive_connections=concurrency or 64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits, transport=transport) as client:
        start = time.perf_counter()
        if concurrency is not None:
            queue = list(reversed(requests))
            outcomes: list[Outcome] = []

            async def user() -> None:
                while queue:
                    outcomes.append(await send(client, base_url, model, queue.pop()))
            await asyncio.gather(*(user() for _ in range(concurrency)))
        else:
            assert request_rate is not None and request_rate > 0
            rng = random.Random(seed)
            tasks = []
            for request in requests:
                tasks.append(asyncio.create_task(send(client, base_url, model, request)))
                await asyncio.sleep(rng.expovariate(request_rate))
            outcomes = list(await asyncio.gather(*tasks))
        return outcomes, time.perf_counter() - start


def percentiles(values: list[float], scale: float = 1e3) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def at(q: float) -> float:  # linear interpolation, as numpy's default
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return (ordered[low] + (ordered[high] - ordered[low]) * (position - low)) * scale
    return {"mean": statistics.fmean(ordered) * scale, "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


def summarize(outcomes: list[Outcome], duration_s: float) -> dict:
    good = [o for o in outcomes if o.ok]
    output_tokens = sum(o.output_tokens for o in good)
    return {
        "requests": len(outcomes), "failed": len(outcomes) - len(good),
        "errors": sorted({o.error for o in outcomes if not o.ok})[:5],
        "duration_s": duration_s, "output_tokens": output_tokens,
        "input_tokens": sum(o.prompt_tokens for o in good),
        "output_tok_s": output_tokens / duration_s, "requests_s": len(good) / duration_s,
        "ttft_ms": percentiles([o.ttft_s for o in good]),
        "tpot_ms": percentiles([t for o in good if (t := o.tpot_s) is not None]),
        "itl_ms": percentiles([t for o in good for t in o.itl_s]),
        "e2e_ms": percentiles([o.e2e_s for o in good]),
        # raw per-request values, for the distribution plots
        "ttft_samples_ms": [o.ttft_s * 1e3 for o in good],
        "tpot_samples_ms": [t * 1e3 for o in good if (t := o.tpot_s) is not None],
    }


def describe(summary: dict) -> str:
    def p(metric: str) -> str:
        values = summary[metric]
        return "-" if values["p50"] is None else f"{values['p50']:.0f}/{values['p90']:.0f}/{values['p99']:.0f}"
    return (f"{summary['requests'] - summary['failed']}/{summary['requests']} ok, {summary['output_tok_s']:.1f} "
            f"output tok/s, {summary['requests_s']:.2f} req/s; p50/p90/p99 ms: TTFT {p('ttft_ms')}, "
            f"TPOT {p('tpot_ms')}, ITL {p('itl_ms')}, e2e {p('e2e_ms')}")


def parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="the model name the server expects")
    parser.add_argument("--tokenizer", required=True, help="a checkpoint folder with tokenizer.json")
    parser.add_argument("--dataset", choices=["random", "shared-prefix"], default="random")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-tokens", default="64-512", help="random: prompt length range (default 64-512)")
    parser.add_argument("--output-tokens", default="32-256", help="output length range (default 32-256)")
    parser.add_argument("--prefixes", type=int, default=4, help="shared-prefix: system prompts (default 4)")
    parser.add_argument("--prefix-tokens", type=int, default=1000, help="shared-prefix: their length (default 1000)")
    parser.add_argument("--question-tokens", type=int, default=32, help="shared-prefix: each request's own tokens")
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--concurrency", type=int, help="requests in flight at once")
    load.add_argument("--request-rate", type=float, help="Poisson arrivals, requests a second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args(argv)
    if args.concurrency is not None and args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.request_rate is not None and args.request_rate <= 0:
        parser.error("--request-rate must be above 0")
    vocab = WordVocabulary(Path(args.tokenizer))
    if args.dataset == "random":
        requests = random_dataset(vocab, args.num_prompts, parse_range(args.prompt_tokens),
                                  parse_range(args.output_tokens), args.seed)
    else:
        requests = shared_prefix_dataset(vocab, args.num_prompts, args.prefixes, args.prefix_tokens,
                                         args.question_tokens, parse_range(args.output_tokens)[0], args.seed)
    print(f"sending {len(requests)} requests ({args.dataset}, seed {args.seed}) to {args.base_url}", flush=True)
    outcomes, duration = asyncio.run(run_load(args.base_url.rstrip("/"), args.model, requests, args.concurrency,
                                              args.request_rate, args.seed))
    summary = summarize(outcomes, duration)
    print(describe(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **summary}, indent=2))
    sys.exit(1 if summary["failed"] else 0)


if __name__ == "__main__":
    main()

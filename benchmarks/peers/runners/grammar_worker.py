"""Times one grammar engine (llguidance or xgrammar) at what structured output asks of it every step: the
allowed-token mask over Qwen3's whole vocabulary, then taking the chosen token.

Standalone (no MILI imports): it runs in MILI's venv for llguidance and in a peer venv for xgrammar (which needs
torch). Prints one JSON object. `python grammar_worker.py --engine llguidance --tokenizer DIR`.

For each workload (a JSON schema with nesting, enums and arrays; any JSON object; a regex) it tokenizes a valid
output with the checkpoint's tokenizer, then replays it `repeats` times through fresh matchers: each step fills
the mask of every row of the batch (the engine's parallel batch call where there is one) and then each matcher
takes the token. Grammar set-up is timed separately: the first matcher of a grammar (compiling it) and a later
one (what a cache of compiled grammars leaves to do per request).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "scores": {"type": "array", "items": {"type": "object",
                                              "properties": {"subject": {"type": "string"},
                                                             "value": {"type": "number"}},
                                              "required": ["subject", "value"], "additionalProperties": False}},
    },
    "required": ["name", "age", "role", "address", "tags", "scores"],
    "additionalProperties": False,
}
NESTED_TEXT = json.dumps({
    "name": "Ada Lovelace", "age": 36, "role": "editor", "address": {"city": "London", "zip": "10115"},
    "tags": ["mathematics", "engines", "poetry of science"],
    "scores": [{"subject": "analysis", "value": 97.5}, {"subject": "notes on the engine", "value": 88}],
})
OBJECT_TEXT = json.dumps({"result": {"items": [1, 2.5, "three", None, True], "note": "free-form JSON object",
                                     "nested": {"depth": 2, "ok": False}}})
REGEX = r"[a-z]+(\.[a-z]+)?@[a-z]+\.(com|org|net) \+[0-9]{2} [0-9]{3} [0-9]{4}"
REGEX_TEXT = "ada.lovelace@example.org +44 207 9460"
WORKLOADS = {  # name -> (kind, spec, a valid output)
    "json_schema (nested)": ("schema", NESTED_SCHEMA, NESTED_TEXT),
    "json_object": ("schema", {"type": "object"}, OBJECT_TEXT),
    "regex": ("regex", REGEX, REGEX_TEXT),
}


class Llguidance:
    def __init__(self, tokenizer_json: str, vocab_size: int, eos: int, threads: int) -> None:
        import llguidance

        self.llg = llguidance
        start = time.perf_counter()
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
        self.setup_s = time.perf_counter() - start
        self.executor = llguidance.LLExecutor(num_threads=threads)
        self.version = llguidance.__version__

    def grammar(self, kind: str, spec: object) -> str:
        matcher = self.llg.LLMatcher
        return matcher.grammar_from_json_schema(spec) if kind == "schema" else matcher.grammar_from_regex(spec)

    def matcher(self, grammar: str) -> object:
        m = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def allocate(self, batch: int, vocab_size: int) -> np.ndarray:
        return np.full((batch, (vocab_size + 31) // 32), -1, np.int32)

    def fill(self, matchers: list, bitmask: np.ndarray) -> None:
        if len(matchers) == 1:
            row = bitmask[0]
            matchers[0].unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        else:
            self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.ctypes.data,
                                                  bitmask.shape[1] * 4, len(matchers))

    @staticmethod
    def accept(m: object, token: int) -> bool:
        return m.consume_token(token)


class Xgrammar:
    def __init__(self, tokenizer_dir: str, vocab_size: int, eos: int, threads: int) -> None:
        import transformers
        import xgrammar

        self.xgr = xgrammar
        start = time.perf_counter()
        hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        self.info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(self.info, max_threads=threads, cache_enabled=True)
        self.setup_s = time.perf_counter() - start
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)
        from importlib.metadata import version

        self.version = version("xgrammar")

    def grammar(self, kind: str, spec: object) -> object:
        if kind == "schema":
            return self.compiler.compile_json_schema(json.dumps(spec))
        return self.compiler.compile_regex(spec)

    def matcher(self, compiled: object) -> object:
        return self.xgr.GrammarMatcher(compiled)

    def allocate(self, batch: int, vocab_size: int) -> object:
        return self.xgr.allocate_token_bitmask(batch, vocab_size)

    def fill(self, matchers: list, bitmask: object) -> None:
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    @staticmethod
    def accept(m: object, token: int) -> bool:
        return m.accept_token(token)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def measure(engine: Llguidance | Xgrammar, tokens: list[int], grammar: object, batch: int, vocab_size: int,
            repeats: int) -> dict[str, float]:
    bitmask = engine.allocate(batch, vocab_size)
    fill_us: list[float] = []
    accept_us: list[float] = []
    for _ in range(repeats):
        matchers = [engine.matcher(grammar) for _ in range(batch)]
        for token in tokens:
            start = time.perf_counter()
            engine.fill(matchers, bitmask)
            filled = time.perf_counter()
            for m in matchers:
                if not engine.accept(m, token):
                    raise RuntimeError(f"token {token} was refused: the workload's text does not fit its grammar")
            fill_us.append((filled - start) * 1e6)
            accept_us.append((time.perf_counter() - filled) * 1e6)
    return {"mask_us_median": statistics.median(fill_us), "mask_us_mean": statistics.fmean(fill_us),
            "mask_us_p90": percentile(fill_us, 90), "mask_us_max": max(fill_us),
            "accept_us_median": statistics.median(accept_us), "steps": len(fill_us)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("llguidance", "xgrammar"), required=True)
    parser.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json (and tokenizer_config.json)")
    parser.add_argument("--vocab-size", type=int, default=151936, help="the model's logits width")
    parser.add_argument("--eos", type=int, default=151645)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    tokenizer_dir = Path(args.tokenizer)
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    if args.engine == "llguidance":
        engine: Llguidance | Xgrammar = Llguidance((tokenizer_dir / "tokenizer.json").read_text(), args.vocab_size,
                                                   args.eos, args.threads)
    else:
        engine = Xgrammar(str(tokenizer_dir), args.vocab_size, args.eos, args.threads)
    rows = []
    for name, (kind, spec, text) in WORKLOADS.items():
        tokens = hf.encode(text, add_special_tokens=False).ids + [args.eos]
        start = time.perf_counter()
        grammar = engine.grammar(kind, spec)
        engine.matcher(grammar)
        first_ms = (time.perf_counter() - start) * 1e3
        start = time.perf_counter()
        engine.matcher(engine.grammar(kind, spec))
        again_ms = (time.perf_counter() - start) * 1e3
        for batch in (int(b) for b in args.batches.split(",")):
            rows.append({"workload": name, "batch": batch, "tokens": len(tokens), "first_matcher_ms": first_ms,
                         "later_matcher_ms": again_ms,
                         **measure(engine, tokens, grammar, batch, args.vocab_size, args.repeats)})
    json.dump({"engine": args.engine, "version": engine.version, "tokenizer_setup_s": engine.setup_s,
               "threads": args.threads, "rows": rows}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

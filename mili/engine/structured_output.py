"""Structured output: what a request's text must match, and the grammar engine that turns it into token masks.

A `StructuredOutput` names the constraint (a JSON schema, any JSON object, a regex, a choice of strings, or a
Lark grammar, llguidance's dialect, which can embed JSON schemas with `%json`). `GrammarBackend` compiles it
with llguidance, chosen by measurement over xgrammar (benchmarks/structured.py; NOTES.md, stop 26): both fill a
mask of Qwen3's 151,936 tokens in at most a few tens of microseconds, but xgrammar imports torch and llguidance
depends on nothing. Compiling happens when the request is prepared (a worker thread, never the step loop) and
is cached by constraint: a later request with the same schema copies a compiled matcher (~3 us, against
~0.5 ms for a new one). The tokenizer tables llguidance needs (~0.7 s to build) are made on first use.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
import numpy as np

from mili.tokenizer import Tokenizer

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "choice", "grammar")
CACHED_GRAMMARS = 256
PARALLEL_FROM = 4  # masks filled by llguidance's thread pool from this many rows on (fewer: in the calling thread)
# JSON as json.dumps writes it (and as Qwen3 writes its tool calls): ", " and ": ", no other whitespace. Flexible
# whitespace lets a model pad forever between tokens (a random-weight one does, never closing the object); a
# schema's own "x-guidance" options override this.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructuredOutputError(ValueError):
    """A constraint that cannot be compiled (the message says why: a bad schema, regex or grammar)."""


@dataclass(frozen=True)
class StructuredOutput:
    """`spec`: the JSON schema as JSON text (json_schema), the regex, the choices as a JSON list (choice), the
    Lark grammar (grammar); unused for json_object. Hashable, so compiled grammars are cached by it."""

    kind: Kind
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool) -> StructuredOutput:
        if schema is False:
            raise StructuredOutputError("the JSON schema false allows no output at all")
        # key order kept: properties come in schema order; `true` (anything) is the empty schema
        return cls("json_schema", json.dumps({} if schema is True else schema))

    @classmethod
    def choice(cls, choices: list[str]) -> StructuredOutput:
        if not choices or not all(isinstance(c, str) for c in choices):
            raise StructuredOutputError("a choice needs a non-empty list of strings")
        return cls("choice", json.dumps(choices))

    def llguidance_grammar(self) -> str:
        """The constraint as an llguidance grammar (raises StructuredOutputError for unusable input)."""
        matcher = llguidance.LLMatcher
        try:
            if self.kind == "json_schema":
                return matcher.grammar_from_json_schema(self.spec, defaults=JSON_OPTIONS)
            if self.kind == "json_object":
                return matcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
            if self.kind == "regex":
                return matcher.grammar_from_regex(self.spec)
            if self.kind == "choice":
                return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(self.spec)))
            return matcher.grammar_from_lark(self.spec)
        except ValueError as exc:
            raise StructuredOutputError(f"the {self.kind.replace('_', ' ')} is not usable: {exc}") from None


def unpack_mask(words: np.ndarray, vocab_size: int) -> np.ndarray:
    """llguidance's bitmask (int32 words, token t = bit t % 32 of word t // 32) as booleans [vocab_size]."""
    return np.unpackbits(words.view(np.uint8), bitorder="little", count=vocab_size).view(bool)


class _TokenTable:
    """The token table llguidance builds its tables from: every token's bytes, added tokens that stand for text
    (<think>, <tool_call>) as their text. (Made from tokenizer.json, llguidance 1.9 marks every added token special
    and then allows <tool_call> for a grammar's literal "<tool_call>" text, which its own matcher then refuses.)
    Ids past the tokenizer's (the model's padded vocabulary) are special: no grammar allows them."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = min(tokenizer.eos_token_ids)
        self.bos_token_id = None
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.tokens += [b""] * (vocab_size - len(self.tokens))
        self.special_token_ids = [*tokenizer.special_token_ids(), *range(tokenizer.vocab_size, vocab_size)]

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)


class GrammarBackend:
    """One engine's llguidance: the tokenizer tables, compiled grammars by constraint, and a thread pool that
    fills many masks at once (the Rust side runs without the GIL)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, threads: int | None = None) -> None:
        self.vocab_size = vocab_size  # the model's logits width (can exceed the tokenizer's ids)
        self.words = (vocab_size + 31) // 32
        self._tokenizer = tokenizer
        self._threads = threads
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._compiled: OrderedDict[StructuredOutput, llguidance.LLMatcher] = OrderedDict()

    def _tables(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenTable(self._tokenizer,
                                                                                                   self.vocab_size)),
                                                            n_vocab=self.vocab_size,
                                                            eos_token=sorted(self._tokenizer.eos_token_ids))
                self._executor = llguidance.LLExecutor(num_threads=self._threads)
            return self._ll_tokenizer

    def matcher(self, constraint: StructuredOutput) -> llguidance.LLMatcher:
        """A fresh matcher at the start of `constraint` (compiled once, then copied). Raises
        StructuredOutputError when the constraint does not compile. Safe to call from any thread."""
        tables = self._tables()
        with self._lock:
            compiled = self._compiled.get(constraint)
            if compiled is not None:
                self._compiled.move_to_end(constraint)
                return compiled.deep_copy()
        compiled = llguidance.LLMatcher(tables, constraint.llguidance_grammar(), log_level=0)
        compiled.compute_bitmask()  # the first mask builds the lexer's first states: limits show up now, as a 400
        if compiled.is_error():
            raise StructuredOutputError(f"the {constraint.kind.replace('_', ' ')} does not compile: "
                                        f"{compiled.get_error()}")
        with self._lock:
            self._compiled[constraint] = compiled
            while len(self._compiled) > CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()

    def fill_masks(self, requests: list[tuple[llguidance.LLMatcher, int, list[int]]], masks: np.ndarray) -> None:
        """Fills rows of `masks` [rows, words] (int32, C-contiguous): for each (matcher, row, guesses), the
        matcher's mask at `row` and, after each guess it accepts in turn, the next row's (speculative
        verification: one mask per verified position). The matchers end where they started. Rows after a
        guess the grammar refuses are left as they were: verification never reaches them."""
        if not requests:
            return
        self._tables()
        assert masks.dtype == np.int32 and masks.flags.c_contiguous and masks.shape[1] == self.words
        plain = [(matcher, row) for matcher, row, guesses in requests if not guesses]
        drafted = [request for request in requests if request[2]]  # llguidance refuses an empty guess list
        if len(plain) < PARALLEL_FROM and not drafted:
            for matcher, row in plain:  # in this thread: waking the pool costs more than a mask or two
                matcher.unsafe_compute_mask_ptr(masks[row].ctypes.data, self.words * 4)
        elif plain:
            self._executor.unsafe_compute_mask_ptr(plain, masks.ctypes.data, self.words * 4, len(masks))
        if drafted:
            self._executor.unsafe_compute_mask_ptr_with_draft_token(drafted, masks.ctypes.data, self.words * 4,
                                                                    len(masks))

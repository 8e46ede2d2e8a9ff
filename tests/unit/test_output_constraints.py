"""Output rules on the engine (mili/engine/output_constraints.py) over Qwen3's real tokenizer and 151,936-wide logits
from the fake model (tests/engine_fakes.py: random logits, so only the rules can make the text well-formed).

- Structured output: every completion under a JSON schema (nesting, enums, arrays, required fields, bounds) parses
  and validates with jsonschema; regex outputs fullmatch; choices are one of the choices. Sampled and greedy.
- Speculative verification applies one mask per verified row: with guesses that follow the constrained greedy
  output, garbled at random (and sprinkled with think tags), the tokens are exactly those of plain decoding.
- logit_bias, min_tokens, the think block (budget, structured output after it) and raw logprobs.
Seeds are printed; replay with MILI_TEST_SEED=<seed>.
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from mili.checkpoints import qwen3_tokenizer_dir
from mili.engine.config import EngineConfig
from mili.engine.engine import Engine, RequestError
from mili.engine.sampler import log_softmax_rows
from mili.engine.sampling_params import SamplingParams, Thinking
from mili.engine.speculative import Proposal, SpeculativeConfig
from mili.engine.structured_output import StructuredOutput
from mili.tokenizer import Tokenizer
from tests.engine_fakes import FakeRunner, context_logits

QWEN3_VOCAB = 151936
THINK, END_THINK, IM_END = 151667, 151668, 151645

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3}},
     "required": ["name", "age", "role", "address", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {
        "ok": {"type": "boolean"},
        "scores": {"type": "array", "items": {"type": "object", "properties": {
            "subject": {"enum": ["math", "art"]}, "value": {"type": "number", "minimum": 0, "maximum": 10}},
            "required": ["subject", "value"], "additionalProperties": False}, "maxItems": 2},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]}},
     "required": ["ok", "scores", "note"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 2, "maxItems": 4},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(qwen3_tokenizer_dir())


def make_engine(tokenizer: Tokenizer, speculative: SpeculativeConfig | None = None) -> Engine:
    return Engine(FakeRunner(2048, 16, vocab_size=QWEN3_VOCAB), tokenizer,
                  EngineConfig(max_num_seqs=16, speculative=speculative))


def run_all(engine: Engine, requests: dict[str, tuple[str | list[int], SamplingParams]]) -> dict:
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                assert out.error is None, out.error
                finished[out.request_id] = out
    assert len(finished) == len(requests)
    return finished


def test_json_schema_outputs_validate(tokenizer, seed):
    engine = make_engine(tokenizer)
    rng = np.random.default_rng(seed)
    requests = {}
    for i, schema in enumerate(SCHEMAS):
        for j in range(3):
            params = SamplingParams(max_tokens=300, temperature=float(rng.choice([0.0, 0.8, 1.5])),
                                    seed=int(rng.integers(1 << 30)),
                                    structured_output=StructuredOutput.json_schema(schema))
            requests[f"s{i}-{j}"] = (f"Write JSON number {j}:", params)
    # any JSON object has unbounded strings: a push towards '":' and '"}' lets the random model close them in time
    closing = [tokenizer.encode(text) for text in ('":', '"}')]
    assert all(len(ids) == 1 for ids in closing)
    requests["object"] = ("Any object:", SamplingParams(max_tokens=300, seed=seed,
                                                        logit_bias={ids[0]: 8.0 for ids in closing},
                                                        structured_output=StructuredOutput("json_object")))
    finished = run_all(engine, requests)
    validated = 0
    for request_id, out in finished.items():
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (request_id, completion.text)
        value = json.loads(completion.text)
        if request_id == "object":
            assert isinstance(value, dict)
        else:
            jsonschema.validate(value, SCHEMAS[int(request_id[1])])
        validated += 1
    assert validated == len(SCHEMAS) * 3 + 1


def test_regex_and_choice_outputs_match(tokenizer, seed):
    engine = make_engine(tokenizer)
    pattern = r"[a-z]{2,5}-[0-9]{3}( (red|green|blue))?"
    choices = ["yes", "no", "it depends", "ничего"]
    requests = {}
    for i in range(4):
        requests[f"regex{i}"] = ("code:", SamplingParams(max_tokens=40, seed=seed + i,
                                                         structured_output=StructuredOutput("regex", pattern)))
        requests[f"choice{i}"] = ("pick:", SamplingParams(max_tokens=40, seed=seed + i,
                                                          structured_output=StructuredOutput.choice(choices)))
    finished = run_all(engine, requests)
    for request_id, out in finished.items():
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop"
        if request_id.startswith("regex"):
            assert re.fullmatch(pattern, text), text
        else:
            assert text in choices, text
    assert len(finished) == 8


def test_bad_constraints_are_request_errors(tokenizer):
    engine = make_engine(tokenizer)
    for constraint, says in [(StructuredOutput("regex", "(unclosed"), "regex"),
                             (StructuredOutput.json_schema({"type": "strin"}), "json schema"),
                             (StructuredOutput("grammar", "start: undefined_rule"), "grammar")]:
        with pytest.raises(RequestError, match=says):
            engine.add_request("bad", "x", SamplingParams(structured_output=constraint))
    assert not engine.has_unfinished()


class ReplayingGuesser:
    """Guesses each sequence's reference continuation (plain decoding's), garbling some guesses and slipping in
    think tags: verification must keep exactly the reference tokens."""

    def __init__(self, references: dict[str, list[int]], rng: np.random.Generator, k: int) -> None:
        self.references, self.rng, self.k = references, rng, k

    def keep_only(self, seq_ids) -> None:
        pass

    def propose(self, seqs, limits) -> list[Proposal]:
        proposals = []
        for seq, limit in zip(seqs, limits):
            reference = self.references[seq.request.request_id]
            done = seq.num_output_tokens
            guesses = list(reference[done:done + min(limit, int(self.rng.integers(1, self.k + 1)))])
            for i in range(len(guesses)):
                roll = self.rng.random()
                if roll < 0.15:
                    guesses[i] = int(self.rng.integers(QWEN3_VOCAB))
                elif roll < 0.2:
                    guesses[i] = int(self.rng.choice([THINK, END_THINK]))
            proposals.append(Proposal(guesses))
        return proposals


def constrained_workload(seed: int) -> dict[str, tuple[str, SamplingParams]]:
    schema = StructuredOutput.json_schema(SCHEMAS[0])
    return {
        "schema": ("a:", SamplingParams.greedy(200, structured_output=schema)),
        "regex": ("b:", SamplingParams.greedy(30, structured_output=StructuredOutput("regex", r"([a-z]+ ){3}\d{4}"))),
        "think-then-schema": ("c: <think>\n", SamplingParams.greedy(200, thinking=Thinking.OPEN,
                                                                    thinking_token_budget=7, structured_output=schema)),
        "bias-min": ("d:", SamplingParams.greedy(30, min_tokens=12, logit_bias={IM_END: 30.0, 11: 5.0})),
        "sampled-schema": ("e:", SamplingParams(max_tokens=200, seed=seed, structured_output=schema)),
    }


def test_speculative_verification_masks_every_row(tokenizer, seed):
    rng = np.random.default_rng(seed)
    plain = run_all(make_engine(tokenizer), constrained_workload(seed))
    references = {rid: out.outputs[0].token_ids for rid, out in plain.items()}
    config = SpeculativeConfig("ngram", num_speculative_tokens=5, max_batch_size=16)
    engine = make_engine(tokenizer, config)
    engine.proposer = ReplayingGuesser(references, rng, 5)
    speculative = run_all(engine, constrained_workload(seed))
    compared = 0
    for rid, out in speculative.items():
        assert out.outputs[0].token_ids == references[rid], rid
        assert out.outputs[0].finish_reason == plain[rid].outputs[0].finish_reason
        compared += len(references[rid])
    assert engine.speculation.accepted > 0 and engine.speculation.accepted < engine.speculation.proposed  # both kinds
    assert compared >= 100, compared
    json.loads(plain["schema"].outputs[0].text)
    jsonschema.validate(json.loads(plain["sampled-schema"].outputs[0].text), SCHEMAS[0])


def test_logit_bias_pushes_and_bans_tokens(tokenizer, seed):
    engine = make_engine(tokenizer)
    favourite = 9707  # "Hello"
    finished = run_all(engine, {
        "push": ("x", SamplingParams(max_tokens=8, seed=seed, logit_bias={favourite: 100}, ignore_eos=True)),
        "ban": ("x", SamplingParams.greedy(8, logit_bias={t: -100 for t in range(0, 151643, 2)}, ignore_eos=True)),
    })
    assert finished["push"].outputs[0].token_ids == [favourite] * 8
    banned = finished["ban"].outputs[0].token_ids
    assert len(banned) == 8 and all(t % 2 == 1 or t >= 151643 for t in banned), banned


@pytest.mark.parametrize("min_tokens", [0, 1, 9])
def test_min_tokens_bars_stop_tokens_and_strings(tokenizer, seed, min_tokens):
    engine = make_engine(tokenizer)
    finished = run_all(engine, {"r": ("x", SamplingParams(max_tokens=20, seed=seed, min_tokens=min_tokens,
                                                          logit_bias={IM_END: 100}))})
    out = finished["r"].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == IM_END
    assert out.num_tokens == min_tokens + 1, out.token_ids  # the stop token counts as generated


def test_thinking_budget_closes_the_block_then_the_answer_matches(tokenizer, seed):
    engine = make_engine(tokenizer)
    schema = StructuredOutput.json_schema(SCHEMAS[2])
    finished = run_all(engine, {
        "open": ("q <think>\n", SamplingParams(max_tokens=100, seed=seed, thinking=Thinking.OPEN,
                                               thinking_token_budget=5, structured_output=schema)),
        "may-open": ("q", SamplingParams(max_tokens=40, seed=seed, thinking=Thinking.MAY_OPEN, thinking_token_budget=3,
                                         logit_bias={THINK: 100})),
        "zero": ("q <think>\n", SamplingParams(max_tokens=10, seed=seed, thinking=Thinking.OPEN,
                                               thinking_token_budget=0, ignore_eos=True)),
        "unbounded": ("q <think>\n", SamplingParams(max_tokens=12, seed=seed, thinking=Thinking.OPEN)),
    })
    opened = finished["open"].outputs[0]
    assert opened.token_ids[5] == END_THINK and END_THINK not in opened.token_ids[:5]
    assert opened.num_reasoning_tokens == 6  # 5 thought, then the closing tag
    jsonschema.validate(json.loads(opened.text.split("</think>", 1)[1]), SCHEMAS[2])
    may_open = finished["may-open"].outputs[0]
    assert may_open.token_ids[:5] == [THINK, THINK, THINK, THINK, END_THINK]  # opened (biased), 3 thought, closed
    assert may_open.num_reasoning_tokens == 5
    assert finished["zero"].outputs[0].token_ids[0] == END_THINK
    unbounded = finished["unbounded"].outputs[0].token_ids
    expected = unbounded.index(END_THINK) + 1 if END_THINK in unbounded else len(unbounded)
    assert finished["unbounded"].outputs[0].num_reasoning_tokens == expected


def test_logprobs_are_the_models_own_under_a_grammar(tokenizer, seed):
    engine = make_engine(tokenizer)
    prompt = tokenizer.encode("digits:")
    finished = run_all(engine, {"r": (prompt, SamplingParams(max_tokens=6, seed=seed, logprobs=2, structured_output=
                                                             StructuredOutput("regex", "[0-9]{6}")))})
    out = finished["r"].outputs[0]
    context = list(prompt)
    for token, sampled in zip(out.token_ids, out.logprobs):
        raw = log_softmax_rows(context_logits(np.array(context), QWEN3_VOCAB)[None])[0]
        assert sampled.logprob == pytest.approx(raw[token], abs=1e-5)
        assert [t for t, _ in sampled.top_logprobs] == list(np.argsort(-raw)[:2])
        context.append(token)
    assert re.fullmatch("[0-9]{6}", out.text)

"""AsyncEngine: concurrent streams, early disconnects, request errors; the step loop on its own thread."""

from __future__ import annotations

import asyncio

import pytest

from mili.engine.async_engine import AsyncEngine
from mili.engine.config import EngineConfig
from mili.engine.engine import Engine, RequestError
from mili.engine.sampling_params import SamplingParams
from mili.tokenizer import Tokenizer
from tests.integration.conftest import model_pair
from tests.integration.test_engine import prompts, tokens_alone

CHECKPOINT = "tiny-tied-gqa2-d64"


def test_concurrent_streams_disconnects_and_errors(rng):
    pair = model_pair(CHECKPOINT)
    engine = Engine(pair.runner, Tokenizer.from_pretrained(pair.path), EngineConfig(max_num_seqs=16))
    batch = prompts(rng, 12)
    params = SamplingParams.greedy(max_tokens=16, ignore_eos=True)

    async def full_stream(prompt):
        deltas, last = [], None
        async for out in async_engine.generate(prompt, params):
            deltas.append(out.outputs[0].delta)
            last = out
        return "".join(deltas), last

    async def leaves_early(prompt):
        async for out in async_engine.generate(prompt, params):
            if out.outputs[0].num_tokens >= 3:
                break  # the client went away

    async def main():
        results = await asyncio.gather(*(full_stream(p) for p in batch[:8]), *(leaves_early(p) for p in batch[8:]))
        with pytest.raises(RequestError, match="empty"):
            async for _ in async_engine.generate([], params):
                pass
        await asyncio.sleep(0.2)  # the aborts are applied by the loop thread between steps
        await async_engine.call(lambda: (engine.check_blocks(), engine.cache.clear()))
        await async_engine.shutdown()
        return results

    async_engine = AsyncEngine(engine)
    loop = asyncio.new_event_loop()
    try:
        results = loop.run_until_complete(main())
    finally:
        loop.close()
    for (text, last), prompt in zip(results[:8], batch):
        assert last.finished and text == last.outputs[0].text
        assert last.outputs[0].token_ids == tokens_alone(pair, prompt, params)
    assert engine.pool.num_free == engine.pool.num_blocks and not engine.has_unfinished()

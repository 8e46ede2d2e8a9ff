"""Delta outputs and the per-request stream between the engine thread and the event loop: a reader that
falls behind gets one merged output (its unread text), not a copy per step, and loses nothing."""

from __future__ import annotations

import asyncio

from mili.engine.async_engine import EngineDeadError, RequestStream
from mili.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from mili.engine.sampler import SampledToken

METRICS = RequestMetrics(0.0, None, None, None, None, 0, 0)


def step_output(step: int, finished: bool = False) -> RequestOutput:
    token = SampledToken(step, -float(step))
    completion = CompletionOutput(0, f"<{step}>", [step], [token], "length" if finished else None, step + 1)
    return RequestOutput("r", [1, 2], [completion], finished, METRICS)


def test_a_slow_reader_gets_one_merged_output_with_everything_in_order():
    async def main() -> list[RequestOutput]:
        stream = RequestStream(asyncio.get_running_loop())
        for step in range(1000):  # the engine ran 1000 steps while the reader was away
            stream.put(step_output(step, finished=step == 999))
        assert stream._pending is not None and len(stream._pending.outputs) == 1  # one output held, not 1000
        return [await stream.get()]

    (merged,) = asyncio.run(main())
    c = merged.outputs[0]
    assert merged.finished and c.finish_reason == "length" and c.num_tokens == 1000
    assert c.delta_token_ids == list(range(1000)) and [t.token for t in c.delta_logprobs] == list(range(1000))
    assert c.delta == "".join(f"<{i}>" for i in range(1000))


def test_an_error_comes_after_the_output_that_preceded_it():
    async def main() -> tuple[RequestOutput, BaseException]:
        stream = RequestStream(asyncio.get_running_loop())
        stream.put(step_output(0))
        stream.put(EngineDeadError("gone"))
        first = await stream.get()
        try:
            await stream.get()
        except EngineDeadError as exc:
            return first, exc
        raise AssertionError("the error was lost")

    first, error = asyncio.run(main())
    assert first.outputs[0].delta_token_ids == [0] and str(error) == "gone"


def test_merging_keeps_siblings_apart_and_the_latest_finish():
    a = RequestOutput("r", [1], [CompletionOutput(0, "x", [5], None, None, 1)], False, METRICS)
    b = RequestOutput("r", [1], [CompletionOutput(1, "y", [6], None, "stop", 1, "y", [6], None)], False, METRICS)
    c = RequestOutput("r", [1], [CompletionOutput(0, "z", [7], None, "length", 2, "xz", [5, 7], None)], True, METRICS,
                      error=None)
    merged = a.merge(b).merge(c)
    assert [(o.index, o.delta, o.delta_token_ids, o.finish_reason) for o in merged.outputs] == [
        (0, "xz", [5, 7], "length"), (1, "y", [6], "stop")]
    assert merged.finished and merged.outputs[0].text == "xz"

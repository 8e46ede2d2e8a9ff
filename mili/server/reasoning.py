"""Qwen3's reasoning parser: the text of a `<think>...</think>` block goes to `reasoning_content`, the rest to
`content` (vLLM's and SGLang's `--reasoning-parser qwen3`).

Where the block starts depends on the prompt: Qwen3's template leaves it to the model to open it (the output
may begin with `<think>`), newer templates open it in the prompt (the output starts inside it), and with
thinking off the template closes an empty one (every token is answer). The split is incremental: whole bodies
are the streamed deltas joined, so a streamed answer and a plain one say the same. A tag split over several
deltas is held back until it is settled; the blank lines after `</think>` are dropped (the template drops them
too when the answer comes back in the next turn). A block still open at the end is all reasoning: the answer
never came (finish_reason says why, usually "length").
"""

from __future__ import annotations

from dataclasses import dataclass

from mili.engine.completion_text import held_back_length
from mili.engine.sampling_params import Thinking

THINK_START, THINK_END = "<think>", "</think>"


@dataclass
class Split:
    reasoning: str = ""
    content: str = ""

    def __iadd__(self, other: Split) -> Split:
        self.reasoning += other.reasoning
        self.content += other.content
        return self


class ReasoningSplitter:
    """One choice's text, fed in deltas, split into reasoning and content deltas."""

    def __init__(self, start: Thinking) -> None:
        self._state = {Thinking.OFF: "answer", Thinking.MAY_OPEN: "undecided", Thinking.OPEN: "thinking"}[start]
        self._held = ""
        self._answer_started = start is Thinking.OFF  # an answer after a think block: its leading blank lines go
        self.saw_reasoning = start is Thinking.OPEN

    def feed(self, text: str, final: bool = False) -> Split:
        """The reasoning and content that `text` settles (`final`: the text ends here; release everything)."""
        text = self._held + text
        self._held = ""
        out = Split()
        while text:
            if self._state == "undecided":
                if text.startswith(THINK_START):
                    self._state, self.saw_reasoning = "thinking", True
                    text = text[len(THINK_START):]
                elif THINK_START.startswith(text) and not final:
                    self._held = text
                    return out
                else:
                    self._state, self._answer_started = "answer", True  # no block: the answer starts at once
            elif self._state == "thinking":
                end = text.find(THINK_END)
                if end == -1:
                    keep = 0 if final else held_back_length(text, (THINK_END,))
                    out.reasoning += text[:len(text) - keep]
                    self._held = text[len(text) - keep:]
                    return out
                out.reasoning += text[:end]
                text = text[end + len(THINK_END):]
                self._state = "answer"
            else:
                if not self._answer_started:
                    text = text.lstrip("\n")
                    self._answer_started = bool(text)
                out.content += text
                return out
        return out

    def finish(self) -> Split:
        return self.feed("", final=True)


def split_reasoning(text: str, start: Thinking) -> tuple[str | None, str]:
    """(reasoning or None where there was no think block, content) of a whole completion."""
    splitter = ReasoningSplitter(start)
    split = splitter.feed(text, final=True)
    return (split.reasoning if splitter.saw_reasoning else None), split.content

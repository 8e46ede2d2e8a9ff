"""The Qwen3 tokenizer: Hugging Face `tokenizers` on tokenizer.json, and the chat template.

The chat template from tokenizer_config.json is rendered with jinja2 set up exactly as transformers
sets it up (sandboxed, trim_blocks + lstrip_blocks, loop controls, its `tojson`, `raise_exception`
and `strftime_now`), so `apply_chat_template` gives transformers' text byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from mili.config import GenerationConfig, ModelConfig

if TYPE_CHECKING:
    from mili.gguf.files import GGUFModel

Message = dict[str, Any]


class TokenizerError(ValueError):
    """Missing or unusable tokenizer files, or a chat the template rejects."""


class _GenerationBlock(jinja2.ext.Extension):
    """Accepts transformers' `{% generation %}...{% endgeneration %}` tag and renders its body as is
    (transformers uses it only to build assistant-token masks for training)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    # Like transformers: no HTML escaping, unlike jinja's built-in filter.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"the chat template in tokenizer_config.json does not parse: {exc}") from None


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


@dataclass(frozen=True)
class SpecialTokens:
    eos_token: str | None
    pad_token: str | None
    bos_token: str | None
    unk_token: str | None
    additional_special_tokens: tuple[str, ...]

    def template_variables(self) -> dict[str, Any]:
        """What transformers passes to the template besides the messages (its special_tokens_map)."""
        names = ("eos_token", "pad_token", "bos_token", "unk_token")
        variables: dict[str, Any] = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        if self.additional_special_tokens:
            variables["additional_special_tokens"] = list(self.additional_special_tokens)
        return variables


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (Qwen's too): the character that stands for each byte in the vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_level_alphabet()


class Tokenizer:
    """Encode, decode and chat-format text for one Qwen3 checkpoint folder."""

    def __init__(
        self,
        hf_tokenizer: HFTokenizer,
        tokenizer_config: dict[str, Any],
        eos_token_ids: Sequence[int],
    ) -> None:
        self._hf = hf_tokenizer
        self.special_tokens = SpecialTokens(
            eos_token=_token_content(tokenizer_config.get("eos_token")),
            pad_token=_token_content(tokenizer_config.get("pad_token")),
            bos_token=_token_content(tokenizer_config.get("bos_token")),
            unk_token=_token_content(tokenizer_config.get("unk_token")),
            additional_special_tokens=tuple(
                _token_content(t) for t in tokenizer_config.get("additional_special_tokens") or ()
            ),
        )
        template = tokenizer_config.get("chat_template")
        self._chat_template_source: str | None = template if isinstance(template, str) else None
        self.eos_token_ids: frozenset[int] = frozenset(eos_token_ids)
        # Ids the tokenizer can produce (added tokens included). Read once: tokenizers recounts the
        # whole vocabulary on every get_vocab_size call (~60 ms for Qwen3's).
        self.vocab_size: int = hf_tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        """Reads tokenizer.json, tokenizer_config.json, generation_config.json and config.json.

        Stop tokens are the union of generation_config.json's `eos_token_id`, config.json's and the
        tokenizer's own `eos_token`, as transformers' `generate` stops on each of them.
        """
        model_dir = Path(model_dir)
        tokenizer_json = model_dir / "tokenizer.json"
        if not tokenizer_json.exists():
            raise TokenizerError(f"{tokenizer_json} not found: MILI needs the fast-tokenizer file tokenizer.json")
        try:
            hf = HFTokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{tokenizer_json} could not be loaded: {exc}") from None
        config_path = model_dir / "tokenizer_config.json"
        tokenizer_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        eos_ids = list(GenerationConfig.from_pretrained(model_dir).eos_token_ids)
        if (model_dir / "config.json").exists():
            eos_ids += ModelConfig.from_pretrained(model_dir).eos_token_ids
        eos_token = _token_content(tokenizer_config.get("eos_token"))
        if eos_token is not None and hf.token_to_id(eos_token) is not None:
            eos_ids.append(hf.token_to_id(eos_token))
        return cls(hf, tokenizer_config, eos_ids)

    @classmethod
    def from_gguf(cls, model: GGUFModel) -> Tokenizer:
        """The tokenizer and chat template a GGUF file carries (`tokenizer.ggml.*`, `tokenizer.chat_template`);
        stop tokens as llama.cpp stops: eos, eot and eom ids, and <|im_end|> / <|endoftext|>."""
        from mili.gguf.tokenizer import read_tokenizer  # gguf-py adds ~75 ms to every import; only GGUF models pay

        built = read_tokenizer(model)
        return cls(built.hf, built.tokenizer_config, built.eos_token_ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Qwen3 adds no BOS token; special-token strings in the text are recognised."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def special_token_ids(self) -> list[int]:
        """Ids of the added tokens marked special (<|im_end|>, ...), not of those that stand for text (<think>)."""
        return sorted(i for i, token in self._hf.get_added_tokens_decoder().items() if token.special)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    @cached_property
    def _added_token_ids(self) -> frozenset[int]:
        return frozenset(self._hf.get_added_tokens_decoder())

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a token may hold part of a UTF-8 character, so not all are text)."""
        piece = self._hf.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added_token_ids or any(c not in _BYTE_OF_CHAR for c in piece):
            return piece.encode("utf-8")
        return bytes(_BYTE_OF_CHAR[c] for c in piece)

    @cached_property
    def _chat_template(self) -> jinja2.Template:
        if self._chat_template_source is None:
            raise TokenizerError("this model's tokenizer_config.json has no chat_template; send a plain prompt instead")
        return compile_chat_template(self._chat_template_source)

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Renders a conversation to prompt text, as transformers' `apply_chat_template(tokenize=False)`.

        `enable_thinking=None` leaves the template's default (Qwen3: thinking on).
        """
        if not messages:
            raise TokenizerError("a chat needs at least one message")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise TokenizerError(f"message {i} must be an object with a 'role' (and usually 'content')")
        variables = self.special_tokens.template_variables() | template_kwargs
        if enable_thinking is not None:
            variables["enable_thinking"] = enable_thinking
        try:
            return self._chat_template.render(
                messages=list(messages),
                tools=list(tools) if tools is not None else None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except (jinja2.TemplateError, TypeError, ValueError) as exc:  # TypeError: e.g. tojson of a malformed field
            raise TokenizerError(f"the chat template rejected these messages: {exc}") from None

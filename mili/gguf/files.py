"""Finding and opening a GGUF model: one `.gguf` file, a folder holding exactly one model, or a split set
(`name-00001-of-00003.gguf`, ...; the first file carries the metadata, every file some tensors).

Files are opened with gguf-py's GGUFReader, which memory-maps them: nothing is read until a tensor is used.
Anything unreadable is a GGUFError naming the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gguf import GGUFReader, GGUFValueType

from mili.config import ConfigError

SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GGUFError(ConfigError):
    """A GGUF model MILI cannot run; the message names the file, key or tensor and what is wrong (a ConfigError:
    the GGUF file plays config.json's part)."""


def _split_set(first: Path) -> list[Path]:
    """All files of the split set `first` belongs to, in order; checks that none is missing."""
    match = SPLIT_NAME.match(first.name)
    if match is None:
        return [first]
    count = int(match["count"])
    paths = [first.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise GGUFError(f"{first} is part {int(match['index'])} of a {count}-file split model; "
                        f"missing beside it: {', '.join(missing)}")
    return paths


def gguf_files(model: str | Path) -> list[Path]:
    """The files of the GGUF model at `model`: a .gguf file (any part of a split set names the whole set), or a
    folder holding exactly one model."""
    path = Path(model)
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        firsts = [p for p in found if (m := SPLIT_NAME.match(p.name)) is None or int(m["index"]) == 1]
        if len(firsts) != 1:
            names = ", ".join(p.name for p in firsts) or "none"
            raise GGUFError(f"{path} must hold exactly one GGUF model to be loaded as one; it holds {names}: "
                            "pass the file itself as --model")
        return _split_set(firsts[0])
    if not path.is_file():
        raise GGUFError(f"{path} does not exist")
    match = SPLIT_NAME.match(path.name)
    if match is not None and int(match["index"]) != 1:
        path = path.with_name(f"{match['stem']}-00001-of-{match['count']}.gguf")
    return _split_set(path)


class _Reader(GGUFReader):
    """gguf-py's reader, with arrays (a Qwen tokenizer's 151,936 tokens and token types, ~151k merges) read in one
    pass instead of two numpy memmap views per element: GGUFReader spends ~10 s on Qwen's vocabulary, this under a
    second. The fields it builds read the same (ReaderField.contents() takes each element part's tobytes() or
    tolist())."""

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[Any], list[int], list[GGUFValueType]]:
        if raw_type != GGUFValueType.ARRAY or self.byte_order == "S":
            return super()._get_field_parts(orig_offs, raw_type)
        item_type, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        kind, length = GGUFValueType(int(item_type[0])), int(count[0])
        offs = orig_offs + 12
        parts: list[Any] = [item_type, count]
        if kind == GGUFValueType.STRING:
            view = memoryview(self.data)
            for _ in range(length):
                size = int.from_bytes(view[offs:offs + 8], "little")
                if offs + 8 + size > len(view):
                    raise ValueError(f"a string at byte {offs} runs past the end of the file")
                parts += [view[offs:offs + 8], view[offs + 8:offs + 8 + size]]
                offs += 8 + size
            data_indices = list(range(3, len(parts), 2))
        elif kind in self.gguf_scalar_to_np:
            values = np.array(self._get(offs, self.gguf_scalar_to_np[kind], length))  # a copy: no memmap views
            parts += list(values.reshape(length, 1))
            offs += values.nbytes
            data_indices = list(range(2, len(parts)))
        else:  # arrays of arrays: gguf-py's own way
            return super()._get_field_parts(orig_offs, raw_type)
        return offs - orig_offs, parts, data_indices, [GGUFValueType.ARRAY] + ([kind] if length else [])


def _open(path: Path) -> GGUFReader:
    try:
        return _Reader(path)
    except (ValueError, OSError, IndexError, KeyError) as exc:  # gguf-py's errors for bad magic, short files, ...
        raise GGUFError(f"{path} is not a readable GGUF file ({exc})") from None


@dataclass
class GGUFModel:
    """An opened GGUF model: its files' readers and the first file's metadata as Python values."""

    paths: list[Path]
    readers: list[GGUFReader]
    metadata: dict[str, Any] = field(repr=False)

    @classmethod
    def open(cls, model: str | Path) -> GGUFModel:
        paths = gguf_files(model)
        readers = [_open(p) for p in paths]
        metadata = {name: value.contents() for name, value in readers[0].fields.items()
                    if not name.startswith("GGUF.")}
        return cls(paths, readers, metadata)

    @property
    def name(self) -> str:
        return self.paths[0].name

    def value(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        """Metadata `key` checked to be of `kind` (int, float, str, bool or list); `default` when absent, or a
        GGUFError naming the key when there is no default."""
        if key not in self.metadata:
            if default is ...:
                raise GGUFError(f"{self.name} lacks the metadata key '{key}'")
            return default
        value = self.metadata[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise GGUFError(f"{self.name}: metadata key '{key}' is {value!r}, expected "
                            f"{' or '.join(k.__name__ for k in kinds)}")
        return value

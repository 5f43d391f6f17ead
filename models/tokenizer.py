"""Tokenizers: a Hugging Face `tokenizer.json` through the `tokenizers` library, and a built-in
byte-level tokenizer for presets. Both expose the same small interface."""

from __future__ import annotations

import json
from pathlib import Path


class ByteTokenizer:
    """Bytes 0..255 map to ids 3..258; 0 is padding, 1 BOS, 2 EOS (the ByT5 convention)."""

    pad_id, bos_id, eos_id = 0, 1, 2
    offset = 3

    def __init__(self, vocab_size: int = 259):
        if vocab_size < 259:
            raise ValueError(f"ByteTokenizer needs vocab_size >= 259, got {vocab_size}")
        self.vocab_size = vocab_size
        self.eos_ids: tuple[int, ...] = (self.eos_id,)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids) -> str:
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.offset + 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` with BOS/EOS ids taken from the checkpoint's config files."""

    def __init__(self, path: str | Path, eos_ids: tuple[int, ...] = (), bos_id: int | None = None):
        from tokenizers import Tokenizer

        path = Path(path)
        self._tok = Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
        self.vocab_size = self._tok.get_vocab_size()
        self.bos_id = bos_id
        self.eos_ids = tuple(eos_ids)
        directory = path if path.is_dir() else path.parent
        gen = directory / "generation_config.json"
        if gen.exists():  # generation_config's eos list is the one HF generate uses
            eos = json.loads(gen.read_text()).get("eos_token_id")
            if eos is not None:
                self.eos_ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
        self.eos_id = self.eos_ids[0] if self.eos_ids else None

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

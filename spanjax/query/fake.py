"""Byte-level stand-in tokenizer for offline plan printing and tests.

Ids 0..255 are UTF-8 bytes; 256+ are markup: <|system|> <|user|> <|assistant|>
<|end|>. A message is `[role] + bytes(content) + [end]`; the generation prefix
is `[<|assistant|>]`. Not a model's vocabulary: plans made with it show structure,
not the token counts a real model would see.
"""

from __future__ import annotations

SPECIAL = {"system": 256, "user": 257, "assistant": 258, "end": 259}
_NAMES = {v: k for k, v in SPECIAL.items()}


class ByteTokenizer:
    vocab_size = 260

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_message(self, role: str, content: str) -> list[int]:
        return [SPECIAL[role]] + self.encode(content) + [SPECIAL["end"]]

    def generation_prefix_ids(self) -> list[int]:
        return [SPECIAL["assistant"]]

    def decode(self, ids) -> str:
        out, raw = [], bytearray()
        for t in ids:
            if t < 256:
                raw.append(t)
                continue
            out.append(raw.decode("utf-8", "replace"))
            raw = bytearray()
            out.append(f"<|{_NAMES.get(t, t)}|>")
        out.append(raw.decode("utf-8", "replace"))
        return "".join(out)

"""Tokenizer: a `tokenizers.Tokenizer` plus the model's chat template.

Two sources:

* a Hugging Face directory (`tokenizer.json`, `tokenizer_config.json`, optional
  `chat_template.jinja` / `generation_config.json`);
* GGUF metadata (vocabulary, merges, token types, `tokenizer.ggml.pre`), from
  which we build a byte-level BPE.

GGUF pre-tokenizer note: for `tokenizer.ggml.pre == "smollm"` (and the other
StarCoder-style vocabularies) llama.cpp first isolates every digit, then applies
the GPT-2 regex. We do the same (`Digits(individual_digits=True)` then
`ByteLevel`), which is also what SmolLM2's own `tokenizer.json` does.
transformers' GGUF conversion (5.x) skips the digit split for "smollm"; the ids
are identical except where a run of whitespace is directly followed by a digit
("\\n\\n1.", "x =  42"): there transformers splits the run into single-space
tokens, while llama.cpp, SmolLM2's tokenizer.json and spanjax keep e.g. "ĊĊ"
whole. tests/tokenizer/test_tokenizer.py pins both facts.
"""

from __future__ import annotations

import functools
import json
import os

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from spanjax.tokenizer.chat_template import render

# llama.cpp token types (llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

# End-of-turn tokens of common chat formats; generation stops at any that the vocabulary has.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")

_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre values whose llama.cpp pre-tokenizer is "\p{N}" then the GPT-2 regex.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_SPLIT_REGEX = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}

# Probe contents used to cut a rendered conversation into per-message pieces.
_PROBE_SYSTEM = {"role": "system", "content": "spanjax-probe-system"}
_PROBE_USER = {"role": "user", "content": "spanjax-probe-user"}


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_pre_tokenizer(pre: str | None):
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _SPLIT_REGEX:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    # "gpt2", "default", missing or unknown: plain GPT-2 regex (llama.cpp's default too).
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _token_content(value) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> ids, and chat messages -> prompt text / ids."""

    def __init__(
        self,
        backend: _Backend,
        chat_template: str | None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        add_bos_token: bool = False,
        extra_eos_ids: tuple[int, ...] = (),
    ):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.add_bos_token = add_bos_token
        eos = [self.token_to_id(eos_token)] if eos_token is not None else []
        eos += list(extra_eos_ids)
        eos += [self.token_to_id(t) for t in _END_OF_TURN]
        self._eos_token_ids = tuple(dict.fromkeys(i for i in eos if i is not None))

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        path = os.fspath(path)
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        backend = _Backend.from_file(tj)
        config = {}
        cfg_path = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_path = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        extra_eos: tuple[int, ...] = ()
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token_id")
            extra_eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            backend,
            template,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            pad_token=_token_content(config.get("pad_token")),
            unk_token=_token_content(config.get("unk_token")),
            add_bos_token=bool(config.get("add_bos_token", False)),
            extra_eos_ids=extra_eos,
        )

    @classmethod
    def from_gguf(cls, data) -> Tokenizer:
        """From GGUF tokenizer metadata (`spanjax.models.gguf.GGUFTokenizerData` or any object with its fields)."""
        if data.model != "gpt2":
            raise ValueError(
                f"GGUF tokenizer model {data.model!r} is not supported (only byte-level BPE, 'gpt2'); "
                "load the model from a Hugging Face directory instead"
            )
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        # Tokens are stored in the byte alphabet already, except a few that
        # converters wrote as raw text; spell those byte by byte (as transformers does).
        vocab = {}
        for i, tok in enumerate(data.tokens):
            if not set(tok) <= alphabet:
                tok = "".join(spelling[b] for b in tok.encode("utf-8"))
            vocab.setdefault(tok, i)
        merges = [tuple(m.split(" ")) for m in data.merges]
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
        backend = _Backend(bpe)
        backend.pre_tokenizer = _byte_level_pre_tokenizer(data.pre)
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|> ...) match whole and are special; user-defined ones match whole but are text.
        # A "control" token spelled outside the byte alphabet is a llama.cpp mislabel; skipping it keeps the vocab size.
        control = [
            AddedToken(t, normalized=False, special=True)
            for t, kind in zip(data.tokens, data.token_types)
            if kind == _CONTROL and set(t) <= alphabet
        ]
        user = [
            AddedToken(t, normalized=False, special=False)
            for t, kind in zip(data.tokens, data.token_types)
            if kind == _USER_DEFINED
        ]
        if control:
            backend.add_special_tokens(control)
        if user:
            backend.add_tokens(user)

        def name(i):
            return None if i is None or not 0 <= i < len(data.tokens) else data.tokens[i]

        bos = name(data.bos_token_id)
        if data.add_bos_token and bos is not None:
            # As llama.cpp does for such vocabularies: BOS before plain text when special tokens are asked for.
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, data.bos_token_id)]
            )

        return cls(
            backend,
            data.chat_template,
            bos_token=bos,
            eos_token=name(data.eos_token_id),
            pad_token=name(data.pad_token_id),
            unk_token=name(data.unk_token_id),
            add_bos_token=data.add_bos_token,
        )

    # ------------------------------------------------------------------ text <-> ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: the eos token and the chat end-of-turn token(s)."""
        return self._eos_token_ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Special tokens written in `text` (e.g. "<|im_start|>") always map to their ids.

        `add_special_tokens=True` applies the tokenizer's post-processor (the
        BOS a Llama 3 tokenizer.json or a GGUF with add_bos_token adds; nothing
        for SmolLM2). Rendered chat prompts already hold their specials: encode
        them with the default False.
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat

    def _special_tokens(self) -> dict:
        return {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        return render(self.chat_template, messages, add_generation_prompt, self._special_tokens(), **kwargs)

    def _render(self, messages, add_generation_prompt=False) -> str:
        return self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    @staticmethod
    def _suffix(full: str, prefix: str, what: str) -> str:
        if not full.startswith(prefix):
            raise ValueError(f"chat template is not prefix-stable; cannot isolate {what}")
        return full[len(prefix) :]

    def render_message(self, role: str, content: str) -> str:
        """One message as the template writes it mid-conversation, with nothing injected before it.

        A system message is rendered alone (it opens a conversation, so anything
        the template puts at the very start, such as a BOS, belongs to it). Any
        other message is rendered after a probe system message and the probe's
        own rendering is cut off: that keeps out the default system prompt some
        templates (SmolLM2's) inject when the first message is not a system one.
        This assumes each message renders independently of the ones around it,
        which holds for ChatML-style templates (SmolLM2, Qwen, Granite, Llama 3);
        the invariant test in tests/tokenizer checks it for the shipped model.
        """
        msg = {"role": role, "content": content}
        if role == "system":
            return self._render([msg])
        return self._suffix(self._render([_PROBE_SYSTEM, msg]), self._probe_rendered, f"a {role} message")

    # The template's constant pieces, rendered once: lowering a query renders every message, and
    # jinja2 costs ~40 us a render (a 32-exchange nested query: 5 ms of lowering, half of it these).
    @functools.cached_property
    def _probe_rendered(self) -> str:
        return self._render([_PROBE_SYSTEM])

    @functools.cached_property
    def _generation_prefix(self) -> str:
        msgs = [_PROBE_SYSTEM, _PROBE_USER]
        return self._suffix(self._render(msgs, True), self._render(msgs, False), "the generation prompt")

    @functools.cached_property
    def _generation_prefix_ids(self) -> tuple[int, ...]:
        return tuple(self.encode(self._generation_prefix))

    def encode_message(self, role: str, content: str) -> list[int]:
        return list(self._message_ids(role, content))

    # Queries repeat their messages (the same RAG documents in every query, reordered); encoding
    # 16 documents of 256 tokens is ~4 ms of lowering, about 4% of a RAG query's span TTFT.
    # Per tokenizer (it is in the key through `self`), thread-safe, bounded.
    @functools.lru_cache(maxsize=4096)  # noqa: B019 (tokenizers live as long as their models)
    def _message_ids(self, role: str, content: str) -> tuple[int, ...]:
        return tuple(self.encode(self.render_message(role, content)))

    def generation_prefix(self) -> str:
        """What `add_generation_prompt=True` appends (the assistant header)."""
        return self._generation_prefix

    def generation_prefix_ids(self) -> list[int]:
        return list(self._generation_prefix_ids)

    def default_system_prefix(self) -> str:
        """What the template puts before the first message of a conversation that has no system message
        (SmolLM2: its default system prompt). Empty for templates that inject nothing."""
        user = self.render_message("user", _PROBE_USER["content"])
        full = self._render([_PROBE_USER])
        if not full.endswith(user):
            raise ValueError("chat template is not suffix-stable; cannot isolate its default system prompt")
        return full[: len(full) - len(user)]

    def default_system_prefix_ids(self) -> list[int]:
        return self.encode(self.default_system_prefix())


def completion_ids(tokenizer, content: str) -> list[int]:
    """Generation prefix + the assistant text + the template's end of turn (what the engine
    generates after the prompt)."""
    gen = list(tokenizer.generation_prefix_ids())
    full = list(tokenizer.encode_message("assistant", content))
    if full[: len(gen)] == gen:
        return full
    return gen + list(tokenizer.encode(content)) + list(tokenizer.eos_token_ids[:1])

"""spanjax's Tokenizer against transformers' tokenizer for the same SmolLM2 GGUF (ids, decode, chat template)."""

from __future__ import annotations

import os
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spanjax.tokenizer import ChatTemplateError, Tokenizer

TEXTS = [
    "Hello, world!",
    "héllo wörld — ünïcödé façade naïve",
    "😀🎉 emoji 👩‍👩‍👧 and flags 🇫🇷🇯🇵",
    "中文字符测试，日本語のテキスト、한국어 텍스트",
    "def f(x):\n    return x ** 2  # square\n\nclass A:\n\tpass\n",
    "a   b\t\tc\n\n\nd   ",
    "   leading and trailing   ",
    "line1\r\nline2\rline3\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<repo_name>more<file_sep>",
    "x = [1, 2, 3]; y = {'k': \"v\"}; z = 3.14159e-10",
    "It's 2024, we've 12,345.67 USD and I'll pay 100%.",
    "URL: https://example.com/path?q=1&b=two#frag",
    "Ω≈ç√∫˜µ≤≥÷ ¡™£¢∞§¶•ªº",
    "",
    " ",
    "\n",
    "\u200b zero\u00a0width and nbsp",
]

# Where transformers' GGUF conversion and llama.cpp/SmolLM2's tokenizer.json disagree
# (see spanjax/tokenizer/tokenizer.py):
# a whitespace run directly followed by a digit. spanjax follows llama.cpp and the model's own tokenizer.
DIVERGENT = {
    "\n\n1. item": ["ĊĊ", "1", ".", "Ġitem"],
    "x =  42": ["x", "Ġ=", "ĠĠ", "4", "2"],
    "   12": ["ĠĠĠ", "1", "2"],
    "\t\t3": ["ĉĉ", "3"],
}

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello!\nHow are you? 😀"},
        {"role": "assistant", "content": "Bonjour ! Ça va bien."},
        {"role": "user", "content": "Code:\n```py\nprint('x')\n```"},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "中文"}],
]


@pytest.fixture(scope="module")
def tok(smollm2_gguf_path):
    import gguf

    from spanjax.models.gguf import read_tokenizer_data

    return Tokenizer.from_gguf(read_tokenizer_data(gguf.GGUFReader(smollm2_gguf_path)))


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf_path):
    from transformers import AutoTokenizer

    d, f = os.path.split(smollm2_gguf_path)
    return AutoTokenizer.from_pretrained(d, gguf_file=f)


def _diverges(text: str) -> bool:
    """Where the two pre-tokenizers can differ: llama.cpp's smollm rule isolates every numeric char
    (Unicode N*) first, GPT-2's regex alone keeps " ?\\p{N}+" together. That only changes ids where a
    merge spans the cut: a whitespace run before a digit, or a non-ASCII numeric ("½", "²") next to a
    space or another numeric (the vocabulary has no merges of ASCII digits or of "Ġ" + digit)."""

    def ws(c):
        return c.isspace() or unicodedata.category(c).startswith("Z")

    def num(c):
        return unicodedata.category(c).startswith("N")

    for i, c in enumerate(text):
        if not num(c) or i == 0:
            continue
        prev = text[i - 1]
        if ws(prev) and (not c.isascii() or (i >= 2 and ws(text[i - 2]))):
            return True
        if num(prev) and not (c.isascii() and prev.isascii()):
            return True
    return False


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(tok, hf_tok, text):
    assert not _diverges(text)
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
    | st.text(alphabet=" \n\t\r0123456789abcAB.,'<|>_", max_size=40)
)
def test_ids_match_transformers_property(tok, hf_tok, text):
    ids = tok.encode(text)
    if not _diverges(text):
        assert ids == hf_tok.encode(text, add_special_tokens=False)
    # Not always `text` again: bytes the vocabulary lacks (e.g. 0xF1) are dropped, by both.
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("text,tokens", DIVERGENT.items())
def test_digit_split_follows_llama_cpp(tok, hf_tok, text, tokens):
    ids = tok.encode(text)
    assert [tok.id_to_token(i) for i in ids] == tokens
    assert tok.decode(ids) == text
    # transformers' GGUF conversion splits the whitespace run differently (documented divergence).
    assert ids != hf_tok.encode(text, add_special_tokens=False)


def test_special_tokens(tok, hf_tok):
    assert tok.bos_token_id == 1 and tok.token_to_id("<|im_end|>") == 2
    assert 2 in tok.eos_token_ids
    assert tok.encode("<|im_start|>") == [1]
    assert tok.decode([1, 28120, 2]) == "hello"
    assert tok.decode([1, 28120, 2], skip_special_tokens=False) == "<|im_start|>hello<|im_end|>"
    assert tok.vocab_size == len(hf_tok)
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")  # SmolLM2 adds no BOS


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert tok.encode(ours) == hf_tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )


@pytest.mark.parametrize("messages", [c for c in CONVERSATIONS if c[0]["role"] == "system"])
def test_message_pieces_concatenate_to_the_template(tok, messages):
    pieces = [tok.encode_message(m["role"], m["content"]) for m in messages]
    assert sum(pieces, []) + tok.generation_prefix_ids() == tok.encode(
        tok.apply_chat_template(messages, add_generation_prompt=True)
    )


def test_message_pieces_without_system(tok):
    # Without a system message the template injects its default one; that prefix is available on its own.
    messages = CONVERSATIONS[3]
    pieces = sum((tok.encode_message(m["role"], m["content"]) for m in messages), [])
    full = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    assert tok.default_system_prefix().startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert tok.default_system_prefix_ids() + pieces + tok.generation_prefix_ids() == full
    assert tok.render_message("user", "hi") == "<|im_start|>user\nhi<|im_end|>\n"
    assert tok.generation_prefix() == "<|im_start|>assistant\n"


TEMPLATE_FEATURES = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
    "  {% if loop.index0 > 5 %}{% break %}{% endif %}\n"
    "[{{ m['role'] | upper }}] {{ m['content'] | trim }} {{ m | tojson }}\n"
    "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}{{ eos_token }}"
)


def test_template_features_match_transformers(tok, hf_tok):
    messages = [{"role": "system", "content": " <b>&x</b> é "}, {"role": "user", "content": "q"}]
    theirs = hf_tok.apply_chat_template(
        messages, chat_template=TEMPLATE_FEATURES, tokenize=False, add_generation_prompt=True
    )
    ours = Tokenizer(
        tok.backend, TEMPLATE_FEATURES, bos_token=tok.bos_token, eos_token=tok.eos_token
    ).apply_chat_template(messages)
    assert ours == theirs
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        Tokenizer(tok.backend, TEMPLATE_FEATURES).apply_chat_template([{"role": "tool", "content": "x"}])


def test_sandboxed(tok):
    evil = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError):  # jinja's SecurityError, reported as a template error
        Tokenizer(tok.backend, evil).apply_chat_template([{"role": "user", "content": "x"}])


def test_from_hf_dir(tmp_path, hf_tok):
    # transformers writes tokenizer.json + tokenizer_config.json (+ chat template); read them back.
    hf_tok.save_pretrained(tmp_path)
    t = Tokenizer.from_hf_dir(tmp_path)
    for text in TEXTS + list(DIVERGENT):  # the saved tokenizer.json carries transformers' pre-tokenizer
        assert t.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    for messages in CONVERSATIONS:
        assert t.apply_chat_template(messages) == hf_tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    assert t.bos_token_id == hf_tok.bos_token_id
    assert t.encode("hi there", add_special_tokens=True) == hf_tok.encode("hi there")
    assert hf_tok.eos_token_id in t.eos_token_ids


def test_gguf_add_bos_token(smollm2_gguf_path):
    import dataclasses

    import gguf

    from spanjax.models.gguf import read_tokenizer_data

    data = dataclasses.replace(read_tokenizer_data(gguf.GGUFReader(smollm2_gguf_path)), add_bos_token=True)
    t = Tokenizer.from_gguf(data)
    assert t.encode("hello", add_special_tokens=True) == [1, 28120]
    assert t.encode("hello") == [28120]

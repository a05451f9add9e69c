"""The OpenAI API through the official `openai` client: chat and completions, streaming and
not, n > 1, stop, seed; greedy output equals the same request run alone on a fresh engine."""

from __future__ import annotations

import openai
import pytest

from spanjax.engine.executor import run_query
from spanjax.query import ast as A

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


def alone_chat(engine, max_tokens, stop=()):
    g = A.G("tiny", A.Cross((A.system("Be brief."), A.user("Name a colour."))), max_tokens=max_tokens,
            temperature=0.0, stop=stop)  # fmt: skip
    return run_query(engine, g).final


def test_chat_greedy_equals_the_request_alone_streamed_or_not(client, alone):
    ref = alone_chat(alone, 8)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                       reasoning_effort="low", user="ignored")  # fmt: skip
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ("length" if ref.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == ref.prompt_tokens and r.usage.completion_tokens == ref.generated_tokens
    # Sent again, the whole prompt but its last page is cached.
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_chat_n_seed_and_stop(client, alone):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=6, temperature=1.0, seed=5, n=3)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded: reproducible
    assert len({c.message.content for c in a.choices}) > 1  # seeds seed, seed + 1, ...: different samples
    assert 3 <= a.usage.completion_tokens <= 18
    # stop: the text is cut before the stop string (take one from the greedy output itself).
    full = alone_chat(alone, 8).text
    stop = next(ch for ch in full[2:] if ch != "\ufffd")  # U+FFFD may be an unfinished UTF-8 character
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, stop=[stop])
    assert r.choices[0].message.content == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_completions_streaming_and_not(client):
    r = client.completions.create(model="tiny", prompt="The sky is", max_tokens=6, temperature=0)
    assert r.object == "text_completion" and r.usage.prompt_tokens == len(b"The sky is")
    chunks = list(client.completions.create(model="tiny", prompt="The sky is", max_tokens=6, temperature=0,
                                            stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    n2 = client.completions.create(model="tiny", prompt=["The sky is"], max_tokens=4, n=2, temperature=0.8, seed=1)
    assert len(n2.choices) == 2


def test_completions_batch_of_prompts(client):
    """A list of prompts (spnl's `map` sends one): choice k * n + i is sample i of prompt k."""
    prompts = ["The sky is", "Grass is"]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0) for p in prompts]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [a.choices[0].text for a in alone for _ in range(2)]
    assert r.usage.prompt_tokens == sum(len(p.encode()) for p in prompts)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=["ok", 5], max_tokens=2)
    assert e.value.body["param"] == "prompt"


def test_models_and_errors_in_openai_shape(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10**6)
    assert e.value.body["param"] == "max_tokens" and "context" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=-1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature="hot")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)

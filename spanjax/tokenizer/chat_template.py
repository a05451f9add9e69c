"""Chat templates rendered the way Hugging Face's `apply_chat_template` renders them.

Templates come from model files (untrusted), so they run in jinja2's immutable
sandbox. The environment settings and helpers (`raise_exception`, `tojson`
without HTML escaping, `strftime_now`, loop controls, trim/lstrip blocks) are
the ones transformers uses, so a template renders to the same string here.
"""

from __future__ import annotations

import datetime
import functools
import json

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template raised (`raise_exception`) or could not be rendered."""


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters, which would change prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render(source: str, messages, add_generation_prompt: bool, special_tokens: dict, **kwargs) -> str:
    try:
        return compile_template(source).render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            **special_tokens,
            **kwargs,
        )
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from e

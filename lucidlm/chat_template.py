"""Chat templates: the Jinja template in a checkpoint's ``tokenizer_config.json`` (or ``chat_template.jinja``)
that turns a list of messages into the prompt text the model was trained on.

Rendering follows transformers' ``apply_chat_template`` so prompts match it character for character: the same
sandboxed Jinja environment (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a ``{% generation %}`` block),
the same helpers (``raise_exception``, ``strftime_now``, a ``tojson`` that does not HTML-escape) and the same
variables (``messages``, ``add_generation_prompt``, ``tools``, ``documents``, the special tokens, extra kwargs).
Templates come from the Hub and are untrusted; the sandbox and plain-data copies of the inputs keep them contained,
and every render runs on a budget of steps, sizes and time (see ``chat_sandbox.py``). Errors name the template's file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols

from .chat_sandbox import BoundedSandbox, RenderLimits, TemplateLimitError, render

# The special tokens transformers passes to every template (its SPECIAL_TOKENS_ATTRIBUTES)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_NO_TEMPLATE = ("this checkpoint has no chat template: its tokenizer_config.json has no chat_template "
                "(and there is no chat_template.jinja); pass a template explicitly or format the prompt yourself")


class ChatTemplateError(ValueError):
    """A chat template that cannot render these messages: its own ``raise_exception``, a bug, or a limit."""


class _TemplateRaised(TemplateError):
    """What a template's ``raise_exception(...)`` throws; turned into a ValueError with the template's message."""


def _raise_exception(message: str):
    raise _TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # transformers' override: Jinja's own tojson HTML-escapes <, >, & and ' and sorts keys
    if len(str(indent)) > 16 or (isinstance(indent, int) and indent > 16):  # repeated on every line, at every depth
        raise SecurityError(f"tojson indent {indent!r} is too large (16 at most)")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    if len(fmt) > 1000:  # %c expands twelvefold
        raise SecurityError(f"strftime_now format of {len(fmt)} characters (1000 at most)")
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` for templates, without the type's other attributes."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed attributes (a way towards CPython internals)."""

    def __init__(*args, **kwargs):  # Jinja's signature trick, so that namespace(self=...) still works
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot set underscore-prefixed namespace attributes ({name!r})")


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; here it just renders."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@lru_cache(maxsize=1)
def _environment() -> BoundedSandbox:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.guard_filters()
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_Namespace)
    return env


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().compile_template(template, RenderLimits())
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"invalid chat template (line {e.lineno}): {e.message}") from e
    except TemplateLimitError as e:
        raise ChatTemplateError(f"chat template too large: {e}") from e


def _plain(value: Any) -> Any:
    """A copy made of plain JSON-like types (what the template sees); anything else becomes "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):  # subclasses (str enums, IntEnum, ...) lose their extra methods
        if isinstance(value, base):
            return getattr(base, f"__{base.__name__}__")(value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def validate_messages(messages: Any) -> None:
    """Raise ValueError, naming the message, unless ``messages`` is a non-empty list of chat messages."""
    if not isinstance(messages, list | tuple):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a chat needs at least one message")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where} is a {type(message).__name__}, not a dict with 'role' and 'content'")
        if "role" not in message:
            raise ValueError(f"{where} has no 'role'")
        if not isinstance(message["role"], str):
            raise ValueError(f"{where} has a 'role' of type {type(message['role']).__name__}, not str")
        content = message.get("content")
        if content is None:
            if message["role"] == "assistant" and message.get("tool_calls"):
                continue  # an assistant turn that only calls tools
            raise ValueError(f"{where} has no 'content'" if "content" not in message else
                             f"{where} has 'content' None (allowed only for assistant messages with tool_calls)")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, Mapping):
                    raise ValueError(f"{where}['content'][{j}] is a {type(part).__name__}, not a dict part")
        elif not isinstance(content, str):
            raise ValueError(f"{where} has 'content' of type {type(content).__name__}, not str or a list of parts")


def select_template(template: str | list | dict | None, tools: list | None = None, name: str | None = None) -> str:
    """The template string to render, picked as transformers does from a checkpoint's ``chat_template`` setting:
    a string, or several named templates (a list of {"name", "template"} or a dict): ``name`` if given, else
    "tool_use" when tools are passed and it exists, else "default"."""
    if isinstance(template, list | tuple):
        if not all(isinstance(t, Mapping) and "name" in t and "template" in t for t in template):
            raise ChatTemplateError("a list of chat templates must hold {'name': ..., 'template': ...} entries")
        template = {t["name"]: t["template"] for t in template}
    if isinstance(template, dict):
        if name is None:
            name = "tool_use" if tools is not None and "tool_use" in template else "default"
        if name not in template:
            raise ValueError(f"no chat template named {name!r}; this checkpoint has {sorted(template)}")
        template = template[name]
    if template is None:
        raise ValueError(_NO_TEMPLATE)
    if not isinstance(template, str):
        raise ValueError(f"chat_template must be a string, got {type(template).__name__}")
    return template


def render_chat_template(template: str | list | dict | None, messages: list[dict], *,
                         add_generation_prompt: bool = True, tools: list[dict] | None = None, documents=None,
                         special_tokens: dict[str, str] | None = None, template_file: str | None = None,
                         limits: RenderLimits | None = None, **extra) -> str:
    """Render ``messages`` with a chat template, as transformers' ``apply_chat_template(tokenize=False)`` does.

    ``special_tokens`` ({"bos_token": "<s>", ...}) and ``extra`` (e.g. ``enable_thinking=False``) become template
    variables, ``extra`` winning. A template's ``raise_exception(msg)`` becomes ``ChatTemplateError(msg)`` (a
    ValueError); any other failure, or going past ``limits``, a ChatTemplateError that starts with
    ``template_file`` (where the template came from).
    """
    source = select_template(template, tools)
    validate_messages(messages)
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise ValueError("tools must be JSON schemas (dicts)")
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise ValueError("documents must be dicts with 'title' and 'text' keys")
    try:
        variables = _plain({**(special_tokens or {}), **extra})
        variables.update(messages=_chat(messages), tools=_plain(tools), documents=_plain(documents),
                         add_generation_prompt=add_generation_prompt)
    except RecursionError:
        raise ValueError("messages, tools or documents are nested too deeply") from None
    return _render(source, variables, limits or RenderLimits(), f"{template_file}: " if template_file else "")


def _chat(messages: list) -> list[dict]:
    """The messages as the template sees them: transformers drops None-valued keys (APIs send content=None,
    tool_calls=None) and copies a message's reasoning under the names templates read it by."""
    chat = []
    for message in messages:
        message = {k: v for k, v in _plain(message).items() if v is not None}
        reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


def _render(source: str, variables: dict, limits: RenderLimits, where: str) -> str:
    """Compile (cached) and render on a budget; every failure a ChatTemplateError starting with ``where``."""
    try:
        if len(source) > limits.max_source:
            raise TemplateLimitError(f"the template has {len(source)} characters (the limit is {limits.max_source})")
        return render(_compile(source), limits, variables)
    except _TemplateRaised as e:
        raise ChatTemplateError(e.message) from None
    except ChatTemplateError as e:  # from compiling it
        raise ChatTemplateError(f"{where}{e}") from None
    except TemplateLimitError as e:
        raise ChatTemplateError(f"{where}chat template stopped: {e}") from None
    except RecursionError:
        raise ChatTemplateError(f"{where}chat template failed: it recursed too deeply") from None
    except TemplateError as e:  # undefined names, sandbox violations, ...
        raise ChatTemplateError(f"{where}chat template failed: {type(e).__name__}: {e.message}") from e
    except Exception as e:  # the template's own errors: 1 / 0, 'a' + 1, int('x'), a 5000-digit number printed
        raise ChatTemplateError(f"{where}chat template failed: {type(e).__name__}: {e}") from e

"""The bounded sandbox chat templates render in.

Jinja's sandbox stops a template from reaching Python internals, but not from spending the machine:
``{{ 10 ** 10 ** 9 }}``, ``'x' * 10 ** 10`` or two nested ``range(100000)`` loops hang or allocate
gigabytes. A checkpoint's template is untrusted, so every render here runs on a budget (``RenderLimits``):

- work: each loop-body, loop-test, macro or call-block execution costs its size in template nodes, each
  call, filter, operator and output chunk one more; past ``max_steps`` (or ``seconds``) rendering stops;
- size: no string, list or output may exceed ``max_value`` items, and all of them together ``max_produced``
  (this bounds memory); operators and methods that multiply (``*``, ``**``, ``%``, ``str.format``,
  ``ljust``/``center``/..., ``replace``, ``join``, the padding filters) are checked *before* they allocate;
- integers stay under ``max_int_bits``.

The work is counted by instrumenting the parsed template (see ``_Instrument``): each body starts with a
charge, each output chunk and ``~`` concatenation goes through a checked helper. Filters are wrapped so
that they are never folded at compile time (which would run them outside any budget).
"""

from __future__ import annotations

import contextvars
import math
import re
import time
from collections.abc import Callable, ItemsView, KeysView, ValuesView
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer


@dataclass(frozen=True)
class RenderLimits:
    """What one render may spend. The defaults leave real templates (a few KB, one pass over the messages)
    orders of magnitude of room: 2M steps is a 1000-message chat through a 2000-node loop body."""

    max_source: int = 256 * 1024  # characters of template source (real ones are 1-30 KB)
    max_value: int = 4 * 2**20  # items of any one string/list/dict made, and characters of the output
    max_produced: int = 32 * 2**20  # items made over the whole render: bounds its memory
    max_steps: int = 2_000_000  # weighted executions of loop bodies, macros, calls, filters, operators
    max_int_bits: int = 1 << 16
    seconds: float = 10.0  # a backstop for C-level work the steps do not see (e.g. `in` over long strings)


class TemplateLimitError(SecurityError):
    """A render went past one of its ``RenderLimits``."""


class _Budget:
    __slots__ = ("limits", "steps", "produced", "deadline")

    def __init__(self, limits: RenderLimits) -> None:
        self.limits, self.steps, self.produced = limits, 0, 0
        self.deadline = time.monotonic() + limits.seconds

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.limits.max_steps:
            raise TemplateLimitError(f"more than {self.limits.max_steps} steps (loops, recursion or calls "
                                     "that grow without bound)")
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"rendering took longer than {self.limits.seconds:g} s")

    def fits(self, size: int, what: str = "a value") -> None:
        """Refuse, before it is built, a value of ``size`` items."""
        if size > self.limits.max_value:
            raise TemplateLimitError(f"{what} of about {size} items (the limit is {self.limits.max_value})")

    def made(self, size: int, what: str = "a value") -> None:
        self.fits(size, what)
        self.produced += size
        if self.produced > self.limits.max_produced:
            raise TemplateLimitError(f"more than {self.limits.max_produced} items made in one render")

    def int_fits(self, bits: float) -> None:
        if bits > self.limits.max_int_bits:
            raise TemplateLimitError(f"an integer of about {int(bits)} bits (the limit is "
                                     f"{self.limits.max_int_bits})")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _budget() -> _Budget:
    # Outside render() (nothing should run there, but if it does) sizes are still checked, work is not summed.
    return _BUDGET.get() or _Budget(RenderLimits())


def render(template: jinja2.Template, limits: RenderLimits, variables: dict[str, Any]) -> str:
    """``template.render(**variables)`` on a fresh budget; TemplateLimitError when it runs out."""
    budget = _Budget(limits)
    token = _BUDGET.set(budget)
    try:
        text = template.render(**variables)
    finally:
        _BUDGET.reset(token)
    budget.fits(len(text), "an output")
    return text


# --- sizes ------------------------------------------------------------------------------------------

def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple | dict | set | frozenset) else 0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text_size(value: Any, limit: int) -> int:
    """An upper bound on ``len(str(value))``, found without building it (shared references count every
    time they are printed); stops early once past ``limit``."""
    if isinstance(value, str):
        return len(value)
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str):  # quoted inside containers; non-printable characters are escaped (\U0001f600)
            total += len(v) + 2 if v.isprintable() else 10 * len(v) + 2
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            if total <= limit:
                stack.extend(v.keys())
                stack.extend(v.values())
        elif isinstance(v, list | tuple | set | frozenset | KeysView | ValuesView | ItemsView):
            total += 2 + 2 * len(v)
            if total <= limit:
                stack.extend(v)
        elif isinstance(v, jinja2.utils.Namespace):
            stack.append(object.__getattribute__(v, "_Namespace__attrs"))
        elif _is_int(v):
            total += v.bit_length() // 3 + 2
        else:  # floats, None, booleans, Undefined, loop and macro objects: short fixed texts
            total += 64
    return total


def _stringify(budget: _Budget, value: Any) -> str:
    if isinstance(value, str):
        return value
    budget.fits(_text_size(value, budget.limits.max_value), "the text of a value")
    return str(value)


# --- format strings ---------------------------------------------------------------------------------

_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")
_FIELD = re.compile(r"\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}")


def _args_size(budget: _Budget, args: Any, fields: int) -> int:
    """What ``fields`` substitutions of ``args`` can add: each may print the largest argument."""
    values = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    limit = budget.limits.max_value
    return fields * max((_text_size(v, limit) for v in values), default=0)


def _check_printf(budget: _Budget, fmt: str, args: Any) -> None:
    """``fmt % args``: widths and precisions are padding the result is allocated with."""
    specs = list(_PRINTF.finditer(fmt))
    numbers = [int(g) for m in specs for g in m.groups() if g and g != "*"]
    stars = sum(g == "*" for m in specs for g in m.groups())
    star_ints = [abs(a) for a in (args if isinstance(args, tuple) else (args,)) if _is_int(a)]
    size = len(fmt) + sum(numbers) + (sum(star_ints) if stars else 0) + _args_size(budget, args, len(specs))
    budget.fits(size, "a %-formatted string")


def _check_format(budget: _Budget, fmt: str, args: tuple, kwargs: dict) -> None:
    """``fmt.format(...)``: the numbers in each field's spec are widths/precisions; a nested ``{}`` takes one
    from the arguments."""
    fields = _FIELD.findall(fmt)
    specs = [f.partition(":")[2] for f in fields]
    size = len(fmt) + sum(int(n) for s in specs for n in re.findall(r"\d+", s))
    if any("{" in s for s in specs):
        size += sum(abs(a) for a in (*args, *kwargs.values()) if _is_int(a))
    size += _args_size(budget, (*args, *kwargs.values()), len(fields))
    budget.fits(size, "a formatted string")


# --- operators --------------------------------------------------------------------------------------

def _check_binop(budget: _Budget, op: str, left: Any, right: Any) -> None:
    sequence = str | bytes | list | tuple
    if op == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
        budget.int_fits(right * math.log2(abs(left)))
    elif op == "*":
        if _is_int(left) and _is_int(right):
            budget.int_fits(left.bit_length() + right.bit_length())
        elif isinstance(left, sequence) and _is_int(right):
            budget.fits(len(left) * right, "a repeated sequence")
        elif _is_int(left) and isinstance(right, sequence):
            budget.fits(left * len(right), "a repeated sequence")
    elif op == "+" and isinstance(left, sequence) and isinstance(right, sequence):
        budget.fits(len(left) + len(right), "a concatenation")
    elif op == "%" and isinstance(left, str):
        _check_printf(budget, left, right)


# --- str methods that allocate more than their inputs --------------------------------------------------

def _width(budget: _Budget, s: str, width: Any = 0, *_: Any) -> None:
    if _is_int(width):
        budget.fits(width, "a padded string")


def _expandtabs(budget: _Budget, s: str, tabsize: Any = 8) -> None:
    if _is_int(tabsize):
        budget.fits(len(s) + s.count("\t") * tabsize, "a tab-expanded string")


def _replaced_size(s: str, old: Any, new: Any, count: Any = -1) -> int:
    if not (isinstance(old, str) and isinstance(new, str)):
        return len(s)
    n = s.count(old) if old else len(s) + 1
    if _is_int(count) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(len(new) - len(old), 0)


def _replace(budget: _Budget, s: str, old: Any = "", new: Any = "", count: Any = -1) -> None:
    budget.fits(_replaced_size(s, old, new, count), "a replaced string")


def _joined_size(budget: _Budget, sep: str, items: list) -> int:
    limit = budget.limits.max_value
    return len(sep) * max(len(items) - 1, 0) + sum(_text_size(x, limit) for x in items)


def _refuse(budget: _Budget, s: str, *_: Any) -> None:
    raise SecurityError("str.translate is not available in chat templates (a table can map one character "
                        "to any string)")


_STR_METHODS: dict[str, Callable[..., None]] = {
    "ljust": _width, "rjust": _width, "center": _width, "zfill": _width, "expandtabs": _expandtabs,
    "replace": _replace, "translate": _refuse,
}


def _str_method(obj: Any) -> str | None:
    """The name of ``obj`` if it is a bound method of a string."""
    return obj.__name__ if isinstance(getattr(obj, "__self__", None), str) and callable(obj) else None


# --- filters ------------------------------------------------------------------------------------------

def _filter_center(budget: _Budget, value: Any, width: Any = 80, *_: Any, **__: Any) -> None:
    if _is_int(width):
        budget.fits(width, "a padded string")


def _filter_indent(budget: _Budget, value: Any, width: Any = 4, *_: Any, **kw: Any) -> None:
    width = kw.get("width", width)
    pad = width if _is_int(width) else len(str(width))
    text = str(value) if isinstance(value, str) else ""
    budget.fits(len(text) + pad * (text.count("\n") + 1), "an indented string")


def _filter_wordwrap(budget: _Budget, value: Any, width: Any = 79, *args: Any, **kw: Any) -> None:
    wrap = kw.get("wrapstring", args[1] if len(args) > 1 else None) or "\n"
    width = kw.get("width", width)
    text = value if isinstance(value, str) else ""
    lines = len(text) // max(width, 1) + text.count("\n") + 1 if _is_int(width) else len(text) + 1
    budget.fits(len(text) + lines * len(str(wrap)), "a wrapped string")


def _filter_count(budget: _Budget, value: Any, n: Any = 1, *_: Any, **__: Any) -> None:
    if _is_int(n):  # batch(linecount) fills its last batch up to n; slice(slices) loops n times
        budget.fits(n, "a batch or slice count")
        budget.step(max(n, 0))


def _filter_format(budget: _Budget, value: Any, *args: Any, **kwargs: Any) -> None:
    if isinstance(value, str):
        _check_printf(budget, value, kwargs or args)


def _filter_replace(budget: _Budget, s: Any, old: Any = "", new: Any = "", count: Any = None) -> None:
    if isinstance(s, str):
        budget.fits(_replaced_size(s, old, new, -1 if count is None else count), "a replaced string")


def _filter_text(budget: _Budget, value: Any, *_: Any, **__: Any) -> None:
    budget.fits(_text_size(value, budget.limits.max_value), "the text of a value")


def _filter_sum(budget: _Budget, value: Any, attribute: Any = None, start: Any = 0) -> None:
    if not isinstance(start, int | float):  # summing lists or strings copies them over and over
        raise SecurityError("the sum filter adds numbers only in chat templates")


_FILTERS: dict[str, Callable[..., None]] = {
    "center": _filter_center, "indent": _filter_indent, "wordwrap": _filter_wordwrap, "batch": _filter_count,
    "slice": _filter_count, "format": _filter_format, "replace": _filter_replace, "string": _filter_text,
    "pprint": _filter_text, "tojson": _filter_text, "sum": _filter_sum,
}
_PASS_ARG = {"context": lambda c: (c,), "eval_context": lambda c: (c.eval_ctx,),
             "environment": lambda c: (c.environment,)}


def _guard_filter(name: str, f: Callable) -> Callable:
    """``f`` checked and charged; a context filter, so that Jinja never folds it at compile time."""
    kind = getattr(getattr(f, "jinja_pass_arg", None), "name", None)
    check = _FILTERS.get(name)

    @jinja2.pass_context
    def guarded(context, value=None, *args, **kwargs):
        budget = _budget()
        budget.step()
        if name == "join":
            value = list(value) if not isinstance(value, str) else value
            sep = args[0] if args else kwargs.get("d", "")
            budget.fits(_joined_size(budget, str(sep), list(value)), "a joined string")
        elif check is not None:
            check(budget, value, *args, **kwargs)
        result = f(*_PASS_ARG.get(kind, lambda c: ())(context), value, *args, **kwargs)
        budget.made(_size(result))
        return result

    guarded.__name__ = getattr(f, "__name__", name)
    return guarded


# --- the environment ------------------------------------------------------------------------------------

def _internal(f: Callable) -> Callable:
    f._lucidlm_internal = True  # called straight from the call hook, not counted twice
    return f


@_internal
def _emit(value: Any) -> str:
    """One chunk of output: literal text or a ``{{ }}`` value, as Jinja's ``str(...)`` would print it."""
    budget = _budget()
    text = _stringify(budget, value)
    budget.step()
    budget.made(len(text))
    return text


@_internal
def _concat(*parts: Any) -> str:
    """``a ~ b ~ ...``"""
    budget = _budget()
    texts = [_stringify(budget, p) for p in parts]
    budget.step()
    budget.made(sum(map(len, texts)), "a concatenation")
    return "".join(texts)


@_internal
def _charge(weight: int, literal: int) -> str:
    """One run of a body: ``weight`` steps, and ``literal`` characters of template text it may output."""
    budget = _budget()
    budget.step(weight)
    budget.made(literal)
    return ""


@_internal
def _test(weight: int, value: Any) -> Any:
    _budget().step(weight)
    return value


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with every template instrumented and every operation on a budget."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.globals.pop("lipsum", None)  # lipsum(10**9) writes a billion paragraphs; no template needs it
        self.lucidlm_emit, self.lucidlm_concat, self.lucidlm_charge, self.lucidlm_test = _emit, _concat, _charge, _test

    def guard_filters(self) -> None:
        """Wrap every filter (call once the filters are all registered)."""
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}

    def compile_template(self, source: str, limits: RenderLimits) -> jinja2.Template:
        if len(source) > limits.max_source:
            raise TemplateLimitError(f"the template has {len(source)} characters (the limit is "
                                     f"{limits.max_source})")
        tree = _Instrument().visit(self.parse(source))
        tree.set_environment(self)
        return self.from_string(tree)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.step()
        if operator == "+" and type(left) is str and type(right) is str:  # most of a template's operators
            budget.made(len(left) + len(right), "a concatenation")
            return left + right
        _check_binop(budget, operator, left, right)
        result = self.binop_table[operator](left, right)
        budget.made(_size(result))
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's form)
        if getattr(__obj, "_lucidlm_internal", False):
            return __obj(*args)
        budget = _budget()
        budget.step()
        method = _str_method(__obj)
        if method == "join" and args:
            items = list(args[0])
            budget.fits(_joined_size(budget, __obj.__self__, items), "a joined string")
            args = (items, *args[1:])
        elif method in _STR_METHODS:
            _STR_METHODS[method](budget, __obj.__self__, *args, **_plain_kwargs(kwargs))
        result = super().call(__context, __obj, *args, **kwargs)
        if not isinstance(__obj, jinja2.runtime.Macro):  # a macro's output was charged chunk by chunk
            budget.made(_size(result))
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            mapping = args[0] if is_map and args and isinstance(args[0], dict) else {}
            _check_format(_budget(), fmt, () if is_map else args, mapping or kwargs)
            return wrapper(*args, **kwargs)

        return checked


def _plain_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in ("_loop_vars", "_block_vars")}


# --- instrumentation --------------------------------------------------------------------------------

def _weight(body: list[nodes.Node]) -> int:
    """The size of a body in template nodes: what one execution of it costs."""
    return 1 + sum(1 + sum(1 for _ in n.find_all(nodes.Node)) for n in body)


def _call(name: str, *args: nodes.Expr, like: nodes.Node) -> nodes.Call:
    call = nodes.Call(nodes.EnvironmentAttribute(f"lucidlm_{name}"), list(args), [], None, None)
    return call.set_lineno(like.lineno)


def _literal(body: list[nodes.Node]) -> int:
    """Characters of template text in a body (nested bodies included: an upper bound)."""
    return sum(len(t.data) for n in body for t in [n, *n.find_all(nodes.TemplateData)]
               if isinstance(t, nodes.TemplateData))


def _charged(body: list[nodes.Node], like: nodes.Node) -> list[nodes.Node]:
    """``body`` that first pays for itself each time it runs (its text is not emitted through ``_emit``)."""
    charge = _call("charge", nodes.Const(_weight(body)), nodes.Const(_literal(body)), like=like)
    return [nodes.ExprStmt(charge).set_lineno(like.lineno), *body]


class _Instrument(NodeTransformer):
    """Charge every repeated body, route output and ``~`` through the checked helpers."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        charged = _charged(node.body, node)[0]  # sized before instrumenting
        node = self.generic_visit(node)
        node.body = [charged, *node.body]
        if node.test is not None:  # filtered-out items skip the body, so the test pays for itself
            node.test = _call("test", nodes.Const(_weight([node.test])), node.test, like=node)
        return node

    def _body(self, node: nodes.Macro | nodes.CallBlock) -> nodes.Node:
        charged = _charged(node.body, node)[0]
        node = self.generic_visit(node)
        node.body = [charged, *node.body]
        return node

    visit_Macro = visit_CallBlock = _body

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        node = self.generic_visit(node)  # template text stays as it is: the enclosing body paid for it
        node.nodes = [c if isinstance(c, nodes.TemplateData) else _call("emit", c, like=c) for c in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        node = self.generic_visit(node)
        return _call("concat", *node.nodes, like=node)


"""A checkpoint's chat template cannot hang the process or exhaust its memory: every render runs on a budget
(steps, sizes, time; see lucidlm/chat_sandbox.py) and fails with an error that names the template's file.

The hostile templates run in a forked child with an address-space ceiling and a generous wall-clock guard:
without the bounds they compute for hours or allocate tens of GB, which must fail the test, not the machine.
"""

from __future__ import annotations

import multiprocessing
import resource
import sys

import pytest
from test_chat_template import CHATML_SPECIALS, QWEN25, TOOLS, _trained_bpe

from lucidlm.chat_sandbox import RenderLimits
from lucidlm.chat_template import ChatTemplateError, render_chat_template
from lucidlm.tokenizer import Tokenizer, byte_tokenizer

USER = [{"role": "user", "content": "hi"}]
FILE = "/ckpt/chat_template.jinja"
GUARD_S = 300  # only reached when a bound is missing (the child then runs for hours)

LOOP = "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s OP ns.s %}{% endfor %}{{ ns.s }}"
GRAPH = "{% set ns = namespace(a=['x']) %}{% for i in range(40) %}{% set ns.a = [ns.a, ns.a] %}{% endfor %}"
BIG = "{% set big = 'x' * 4000000 %}"
HOSTILE = {  # template -> words of the error
    "power": ("{{ 10 ** (10 ** 9) }}", "an integer of about"),
    "nested ranges": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    "filtered nested ranges": ("{% for i in range(100000) %}{% for j in range(100000) if false %}{% endfor %}"
                               "{% endfor %}", "steps"),
    "recursive loop": ("{% for x in [1] recursive %}{% if loop.depth < 4 %}{{ loop(range(100000)) }}{% endif %}"
                       "{% endfor %}", "steps"),
    "exponential macro": ("{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
                          "steps"),
    "endless macro": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deeply"),
    "string repetition": ("{{ 'x' * 10**10 }}", "repeated sequence"),
    "list repetition": ("{{ [1] * 10**10 }}", "repeated sequence"),
    "doubling with ~": (LOOP.replace("OP", "~"), "items"),
    "doubling with +": (LOOP.replace("OP", "+"), "concatenation"),
    "shared references printed": (GRAPH + "{{ ns.a }}", "the text of a value"),
    "shared references as JSON": (GRAPH + "{{ ns.a | tojson }}", "the text of a value"),
    "many big strings kept": ("{% set ns = namespace(l=[]) %}" + BIG + "{% for i in range(1000) %}"
                              "{% set ns.l = ns.l + [big ~ i] %}{% endfor %}{{ ns.l | length }}", "made in one render"),
    "literal text in a set block": ("{% set s %}{% for i in range(100000) %}{% for j in range(100000) %}"
                                    + "x" * 200 + "{% endfor %}{% endfor %}{% endset %}{{ s | length }}", "made"),
    "printf width": ("{{ '%10000000000s' % 'x' }}", "%-formatted"),
    "printf star": ("{{ '%*s' % (10000000000, 'x') }}", "%-formatted"),
    "format filter": ("{{ '%10000000000d' | format(1) }}", "%-formatted"),
    "str.format width": ("{{ '{:>10000000000}'.format(1) }}", "formatted string"),
    "str.format nested width": ("{{ '{:>{w}}'.format(1, w=10000000000) }}", "formatted string"),
    "str.format repeated field": (BIG + "{{ ('{0}' * 1000).format(big) }}", "formatted string"),
    "ljust": ("{{ 'x'.ljust(10000000000) }}", "padded string"),
    "center filter": ("{{ 'x' | center(10000000000) }}", "padded string"),
    "indent filter": ("{{ ('x\n' * 2000000) | indent(1000) }}", "indented string"),
    "wordwrap filter": (BIG + "{{ big | wordwrap(1, wrapstring='y' * 1000) }}", "wrapped string"),
    "replace": (BIG + "{{ big.replace('', 'y' * 1000) }}", "replaced string"),
    "replace filter": (BIG + "{{ big | replace('', 'y' * 1000) }}", "replaced string"),
    "join separator": (BIG + "{{ range(100000) | join(big) }}", "joined string"),
    "str.join separator": (BIG + "{{ big.join(range(100000) | map('string')) }}", "joined string"),
    "batch fill": ("{{ [1] | batch(1000000000, 'x') | list }}", "batch or slice"),
    "slice count": ("{{ [1] | slice(1000000000) | list }}", "batch or slice"),
    "mapped padding": ("{{ range(100000) | map('center', 4000000) | list | length }}", "made in one render"),
    "tojson indent": ("{{ messages | tojson(indent=1000000000) }}", "indent"),
    "strftime expansion": ("{{ strftime_now('%c' * 2000000) }}", "strftime_now format"),
    "translate table": ("{{ ('a' * 100000).translate({97: 'x' * 100000}) }}", "translate"),
    "quadratic sum": ("{{ ([[1] * 40] * 100000) | sum(start=[]) }}", "sum filter"),
    "lipsum": ("{{ lipsum(1000000000) }}", "lipsum"),
}


def _child(template: str, conn) -> None:
    try:  # at most 2 GiB more than the child already maps: a missing size bound fails fast instead of swapping
        vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + 2 * 2**30, resource.RLIM_INFINITY))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        render_chat_template(template, USER, template_file=FILE)
        conn.send(("rendered", ""))
    except BaseException as e:  # noqa: B036 - whatever happened, the parent reports it
        conn.send((type(e).__name__, str(e)[:500]))


def _render_in_child(template: str) -> tuple[str, str]:
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(template, send))
    child.start()
    send.close()
    try:
        if not receive.poll(GUARD_S):
            pytest.fail(f"rendering did not finish within {GUARD_S} s")
        return receive.recv()
    except EOFError:
        return "killed", f"exit code {child.exitcode}"
    finally:
        child.kill()
        child.join()


@pytest.mark.skipif(sys.platform != "linux", reason="forks a child with an address-space limit")
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_template_stops_with_an_error_naming_its_file(name):
    template, words = HOSTILE[name]
    kind, message = _render_in_child(template)
    assert kind == "ChatTemplateError", (kind, message)
    assert message.startswith(FILE + ": ") and words in message, message


def test_the_tokenizer_names_the_file_its_template_came_from(tmp_path):
    tok = byte_tokenizer()
    tok.config["chat_template"] = "{{ 'x' * 10**10 }}"
    tok.save(tmp_path / "config")
    with pytest.raises(ChatTemplateError, match="^" + str(tmp_path / "config" / "tokenizer_config.json") + ": "):
        Tokenizer.from_dir(tmp_path / "config").apply_chat_template(USER)
    byte_tokenizer().save(tmp_path / "jinja")
    (tmp_path / "jinja" / "chat_template.jinja").write_text("{{ 10 ** (10 ** 9) }}")
    with pytest.raises(ChatTemplateError, match="^" + str(tmp_path / "jinja" / "chat_template.jinja") + ": "):
        Tokenizer.from_dir(tmp_path / "jinja").apply_chat_template(USER)


@pytest.mark.parametrize("limits, template, words", [
    (RenderLimits(max_steps=1000), "{% for i in range(2000) %}{% endfor %}", "more than 1000 steps"),
    (RenderLimits(seconds=-1), "{% for i in range(3) %}{{ i }}{% endfor %}", "longer than -1 s"),
    (RenderLimits(max_value=10), "{{ messages[0].content }}", "a value of about 11 items"),
    (RenderLimits(max_value=10), "{{ messages[0].content[:6] ~ '' }}{{ 'b' * 6 }}", "an output of about 12 items"),
    (RenderLimits(max_produced=15), "{{ messages[0].content }}{{ messages[0].content }}", "more than 15 items"),
    (RenderLimits(max_int_bits=8), "{{ 2 ** 9 }}", "an integer of about 9 bits"),
    (RenderLimits(max_source=10), "{{ messages | length }}", "the template has 23 characters"),
])
def test_each_limit_is_enforced(limits, template, words):
    with pytest.raises(ChatTemplateError, match=words):
        render_chat_template(template, [{"role": "user", "content": "a" * 11}], limits=limits)


def test_errors_of_the_template_itself_name_the_file():
    for template, words in [("{{ 1 / 0 }}", "ZeroDivisionError"), ("{{ 10 ** 5000 }}", "4300 digits"),
                            ("{% for %}", "invalid chat template")]:
        with pytest.raises(ChatTemplateError, match="^" + FILE + ": .*" + words):
            render_chat_template(template, USER, template_file=FILE)


def test_a_long_real_conversation_fits_the_default_limits():
    chat = [{"role": ("user", "assistant")[i % 2], "content": f"turn {i} " * 20} for i in range(4000)]
    text = render_chat_template(QWEN25, chat, tools=TOOLS)
    assert text.count("<|im_start|>") == 4002 and "turn 3999" in text  # system, every message, generation prompt


def test_bounded_rendering_still_matches_transformers(tmp_path):
    import transformers

    tok = _trained_bpe(CHATML_SPECIALS)
    tok.config["chat_template"] = QWEN25
    tok.save(tmp_path)
    ours, hf = Tokenizer.from_dir(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    chat = [{"role": ("user", "assistant")[i % 2], "content": f"{i} ~ {{x}} %s"} for i in range(9)]
    assert ours.apply_chat_template(chat, tools=TOOLS) == hf.apply_chat_template(chat, tools=TOOLS, tokenize=False,
                                                                                 add_generation_prompt=True)


def test_a_malformed_list_of_templates_is_a_clear_error():
    with pytest.raises(ChatTemplateError, match="'name': ..., 'template': ..."):
        render_chat_template([{"template": "x"}], USER)


def test_messages_nested_past_the_recursion_limit_are_a_clear_error():
    deep: object = "x"
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValueError, match="nested too deeply"):
        render_chat_template("{{ messages | length }}", [{"role": "user", "content": [{"type": "text", "x": deep}]}])

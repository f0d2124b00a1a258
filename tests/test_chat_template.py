"""Chat templates render exactly as transformers' apply_chat_template does (same text, same token ids), for
templates copied from real checkpoints, and fail with clear ValueErrors."""

import json
from datetime import datetime

import pytest
import transformers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lucidlm.chat_template import _compile, render_chat_template, validate_messages
from lucidlm.tokenizer import Tokenizer, byte_tokenizer

# --- templates from real checkpoints -------------------------------------------------------------------------

# Qwen2.5-Instruct: ChatML with a default system prompt, tools serialised with tojson, tool calls and results
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501 (verbatim from the checkpoint)

# Qwen2-Instruct: plain ChatML, default system prompt when none is given
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama-3.1/3.2-Instruct (tool part): strftime_now, tojson(indent=4), one tool call per turn
LLAMA31_TOOLS = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""  # noqa: E501 (verbatim from the checkpoint)

# zephyr-7b-beta: no whitespace control, so the output depends on trim_blocks (and lstrip_blocks, indented)
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
ZEPHYR_INDENTED = ZEPHYR.replace("\n{% ", "\n    {% ")  # lstrip_blocks removes the indent before block tags

# Mistral-7B-Instruct-v0.1
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# gemma-2b-it / gemma-7b-it
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Qwen3-style: namespace() and {% break %}, reasoning_content, an enable_thinking switch passed as an extra keyword,
# content given as a list of parts, and a {% generation %} block (as in training templates)
THINKING = """{%- set ns = namespace(last_user=0) %}
{%- for message in messages[::-1] %}
    {%- if message.role == 'user' %}{% set ns.last_user = messages | length - loop.index %}{% break %}{% endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}{% set content = message.content %}
    {%- else %}{% set content = message.content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('\\n') %}
    {%- endif %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
        {%- if message.reasoning_content and loop.index0 > ns.last_user %}
            {{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- content + '<|im_end|>\\n' }}
        {%- endgeneration %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501

CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA_SPECIALS = ("<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>")
MISTRAL_SPECIALS = ("<s>", "</s>", "<unk>", "[INST]", "[/INST]")
ZEPHYR_SPECIALS = ("<s>", "</s>", "</s>", "<|user|>", "<|system|>", "<|assistant|>")
GEMMA_SPECIALS = ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>")

# --- conversations -------------------------------------------------------------------------------------------

USER_ONLY = [{"role": "user", "content": "Hello!"}]
WITH_SYSTEM = [
    {"role": "system", "content": "Tu es un assistant serviable. Réponds en français."},
    {"role": "user", "content": "Quelle est la capitale de l'Allemagne ?"},
    {"role": "assistant", "content": "Berlin."},
    {"role": "user", "content": "Und auf Japanisch? 日本語で 🗾"},
]
MULTI_TURN = [
    {"role": "user", "content": "  What is 2+2?  "},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Grüße, 世界! Now 3*3?"},
    {"role": "assistant", "content": "9 — easy.\n"},
    {"role": "user", "content": "Thanks <3 & bye"},
]
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in <b>a city</b> & its région — 天気",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "e.g. Zürich"},
                                                        "unit": {"type": "string", "enum": ["c", "f"]}},
                       "required": ["city"]},
    },
}]
TOOL_CHAT = [
    {"role": "user", "content": "Wie ist das Wetter in Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"unit": "c", "city": "Zürich"}}}]},
    {"role": "tool", "content": '{"temperature": 21, "sky": "sonnig ☀"}'},
]


# --- helpers -------------------------------------------------------------------------------------------------

def _byte_level(specials):
    """byte_tokenizer() with the family's special tokens (first three are bos, eos, pad) added."""
    tok = byte_tokenizer(specials[:3])
    tok.backend.add_special_tokens(list(specials[3:]))
    return tok


def _trained_bpe(specials):
    """A small byte-level BPE trained here, so ids depend on real merges (like Qwen's tokenizer)."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [m["content"] for m in WITH_SYSTEM + MULTI_TURN] + ["You are a helpful assistant. " * 3,
                                                                 "system user assistant tool_call " * 4,
                                                                 json.dumps(TOOLS, ensure_ascii=False)]
    backend.train_from_iterator(corpus, trainer)
    return Tokenizer(backend, {"eos_token": specials[0], "pad_token": specials[0],
                               "tokenizer_class": "PreTrainedTokenizerFast"})


def _pair(tmp_path, tok, chat_template):
    """The tokenizer saved with ``chat_template``, loaded by lucidlm and by transformers."""
    tok.config["chat_template"] = chat_template
    tok.save(tmp_path)
    return Tokenizer.from_dir(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)


def _assert_same(ours, hf, messages, add_generation_prompt, **kwargs):
    text = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    ref = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)
    assert text == ref
    ids = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs)
    ref_ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                     return_dict=False, **kwargs)
    assert ids == list(ref_ids)
    assert ours.decode(ids) == text
    return text, ids


FAMILIES = {
    "qwen2.5": (QWEN25, lambda: _trained_bpe(CHATML_SPECIALS)),
    "qwen2": (QWEN2, lambda: _byte_level(("<|endoftext|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>"))),
    "llama3": (LLAMA3, lambda: _byte_level(LLAMA_SPECIALS)),
    "mistral": (MISTRAL, lambda: _byte_level(MISTRAL_SPECIALS)),
    "gemma": (GEMMA, lambda: _byte_level(GEMMA_SPECIALS)),
    "zephyr": (ZEPHYR, lambda: _byte_level(ZEPHYR_SPECIALS)),
    "zephyr_indented": (ZEPHYR_INDENTED, lambda: _byte_level(ZEPHYR_SPECIALS)),
    "thinking": (THINKING, lambda: _trained_bpe(CHATML_SPECIALS)),
}
CHATS = {"user_only": USER_ONLY, "with_system": WITH_SYSTEM, "multi_turn": MULTI_TURN}
UNSUPPORTED = {("mistral", "with_system"), ("gemma", "with_system")}  # they raise on a system role (tested below)


# --- parity with transformers --------------------------------------------------------------------------------

@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("family, chat", [(f, c) for f in FAMILIES for c in CHATS if (f, c) not in UNSUPPORTED])
def test_matches_transformers(tmp_path, family, chat, add_generation_prompt):
    template, make = FAMILIES[family]
    ours, hf = _pair(tmp_path, make(), template)
    text, ids = _assert_same(ours, hf, CHATS[chat], add_generation_prompt)
    for message in CHATS[chat]:  # every message's text is in the prompt (trimmed by some templates)
        assert message["content"].strip() in text
    generation_prompts = ("<|im_start|>assistant\n", "<|assistant|>\n", "<start_of_turn>model\n",
                          "<|start_header_id|>assistant<|end_header_id|>\n\n")
    if family != "mistral":  # Mistral's template has no generation prompt
        assert text.endswith(generation_prompts) == add_generation_prompt


def test_exact_text_and_ids_llama3(tmp_path):
    ours, hf = _pair(tmp_path, _byte_level(LLAMA_SPECIALS), LLAMA3)
    text, ids = _assert_same(ours, hf, WITH_SYSTEM[:2], True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                    "Tu es un assistant serviable. Réponds en français.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nQuelle est la capitale de l'Allemagne ?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    bos = ours.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1  # the template's BOS only: no second one from the post-processor
    assert ids[1] == ours.backend.token_to_id("<|start_header_id|>")  # special tokens are single ids
    assert ids[-1] == ours.backend.token_to_id("\u010a")  # the final "\n" byte


def test_exact_text_qwen2_default_system_prompt(tmp_path):
    ours, hf = _pair(tmp_path, _byte_level(("<|endoftext|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>")), QWEN2)
    text, _ = _assert_same(ours, hf, [{"role": "user", "content": "Привет"}], True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nПривет<|im_end|>\n<|im_start|>assistant\n")
    text, _ = _assert_same(ours, hf, [{"role": "system", "content": "Be brief."}, *USER_ONLY], False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n"


def test_exact_text_zephyr_needs_trim_and_lstrip_blocks(tmp_path):
    for template in (ZEPHYR, ZEPHYR_INDENTED):
        ours, hf = _pair(tmp_path, _byte_level(ZEPHYR_SPECIALS), template)
        text, _ = _assert_same(ours, hf, [{"role": "system", "content": "Sé breve."}, *USER_ONLY], True)
        assert text == "<|system|>\nSé breve.</s>\n<|user|>\nHello!</s>\n<|assistant|>\n"


def test_mistral_and_gemma_exact(tmp_path):
    ours, hf = _pair(tmp_path, _byte_level(MISTRAL_SPECIALS), MISTRAL)
    text, _ = _assert_same(ours, hf, MULTI_TURN[:2], True)
    assert text == "<s>[INST]   What is 2+2?   [/INST]4</s>"
    ours, hf = _pair(tmp_path, _byte_level(GEMMA_SPECIALS), GEMMA)
    text, _ = _assert_same(ours, hf, MULTI_TURN[:2], True)
    assert text == ("<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
                    "<start_of_turn>model\n")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_tools_with_tojson_qwen25(tmp_path, add_generation_prompt):
    ours, hf = _pair(tmp_path, _trained_bpe(CHATML_SPECIALS), QWEN25)
    text, _ = _assert_same(ours, hf, TOOL_CHAT, add_generation_prompt, tools=TOOLS)
    # transformers' tojson: keys in the given order, no HTML escaping, non-ASCII kept (Jinja's own does all three)
    assert json.dumps(TOOLS[0], ensure_ascii=False) in text
    assert '"arguments": {"unit": "c", "city": "Zürich"}}' in text
    assert "<|im_start|>user\n<tool_response>\n" in text and "sonnig ☀" in text
    assert "<|im_start|>assistant\n<tool_call>" in text  # content=None is dropped, as transformers does
    # without tools the same template takes its plain branch
    text, _ = _assert_same(ours, hf, USER_ONLY, add_generation_prompt)
    assert "# Tools" not in text and "You are Qwen" in text


def test_tools_with_indented_tojson_llama31(tmp_path):
    ours, hf = _pair(tmp_path, _byte_level(LLAMA_SPECIALS), LLAMA31_TOOLS)
    text, _ = _assert_same(ours, hf, [{"role": "system", "content": "Sei präzise."}, *TOOL_CHAT], True, tools=TOOLS)
    assert json.dumps(TOOLS[0], ensure_ascii=False, indent=4) in text
    assert '"parameters": {"unit": "c", "city": "Zürich"}}<|eot_id|>' in text
    assert f"Today Date: {datetime.now().strftime('%d %b %Y')}\n" in text  # strftime_now is available
    # OpenAI-style None fields are dropped: 'tool_calls' in message is then false, as in transformers
    chat = [*USER_ONLY, {"role": "assistant", "content": "Hi!", "tool_calls": None}, {"role": "user", "content": "?"}]
    text, _ = _assert_same(ours, hf, chat, False, tools=TOOLS)
    assert "<|start_header_id|>assistant<|end_header_id|>\n\nHi!<|eot_id|>" in text
    text, _ = _assert_same(ours, hf, USER_ONLY, False, date_string="01 Jan 2030")  # extra kwargs reach the template
    assert "Environment: ipython" not in text and "Today Date: 01 Jan 2030\n" in text


def test_thinking_template_extras(tmp_path):
    ours, hf = _pair(tmp_path, _trained_bpe(CHATML_SPECIALS), THINKING)
    chat = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image"},
                                         {"type": "text", "text": "还有这个"}]},
            {"role": "assistant", "content": "Hello", "reasoning_content": "greet back"},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Done", "reasoning": "use the old field name"}]
    text, _ = _assert_same(ours, hf, chat, False)
    assert "Hi\n还有这个" in text and "greet back" not in text  # reasoning before the last user turn is dropped
    assert "<think>\nuse the old field name\n</think>" in text  # 'reasoning' is aliased to reasoning_content
    assert "reasoning_content" not in chat[3]  # the caller's messages are not modified
    text, _ = _assert_same(ours, hf, USER_ONLY, True, enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not ours.apply_chat_template(USER_ONLY, enable_thinking=True).endswith("</think>\n\n")


def test_named_templates_list_picks_default_or_tool_use(tmp_path):
    tok = _byte_level(("<|endoftext|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>"))
    ours, hf = _pair(tmp_path, tok, [{"name": "default", "template": QWEN2},
                                     {"name": "tool_use", "template": "TOOLS {{ tools | length }}"}])
    assert isinstance(ours.chat_template, list)
    text, _ = _assert_same(ours, hf, USER_ONLY, True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.")
    text, _ = _assert_same(ours, hf, USER_ONLY, True, tools=TOOLS)
    assert text == "TOOLS 1"


# --- errors --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("template, specials, messages, message", [
    (MISTRAL, MISTRAL_SPECIALS, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     "Conversation roles must alternate user/assistant/user/assistant/..."),
    (MISTRAL, MISTRAL_SPECIALS, WITH_SYSTEM, "Conversation roles must alternate user/assistant/user/assistant/..."),
    (GEMMA, GEMMA_SPECIALS, WITH_SYSTEM, "System role not supported"),
    (LLAMA31_TOOLS, LLAMA_SPECIALS, [{"role": "assistant", "tool_calls": [TOOL_CHAT[1]["tool_calls"][0]] * 2}],
     "This model only supports single tool-calls at once!"),
])
def test_raise_exception_becomes_value_error(tmp_path, template, specials, messages, message):
    ours, hf = _pair(tmp_path, _byte_level(specials), template)
    with pytest.raises(ValueError) as info:
        ours.apply_chat_template(messages)
    assert str(info.value) == message
    with pytest.raises(Exception, match="^" + message.replace(".", r"\.") + "$"):  # transformers agrees
        hf.apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize("messages, error", [
    ([], "messages is empty"),
    ({"role": "user", "content": "hi"}, "messages must be a list"),
    (["hi"], r"messages\[0\] is a str"),
    ([{"role": "user", "content": "hi"}, {"content": "no role"}], r"messages\[1\] has no 'role'"),
    ([{"role": "user", "content": "hi"}, {"role": None, "content": "x"}], r"messages\[1\] has a 'role' of type"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user"}],
     r"messages\[2\] has no 'content'"),
    ([{"role": "user", "content": 42}], r"messages\[0\] has 'content' of type int"),
    ([{"role": "user", "content": ["just text"]}], r"messages\[0\]\['content'\]\[0\] is a str"),
    ([{"role": "assistant", "content": None}], r"messages\[0\] has 'content' None"),
])
def test_invalid_messages_name_the_index(messages, error):
    with pytest.raises(ValueError, match=error):
        validate_messages(messages)
    with pytest.raises(ValueError, match=error):
        Tokenizer(byte_tokenizer().backend, {"chat_template": QWEN2}).apply_chat_template(messages)


def test_valid_messages_pass():
    validate_messages(WITH_SYSTEM)
    validate_messages(TOOL_CHAT)  # assistant content None is fine with tool_calls
    validate_messages([{"role": "user", "content": [{"type": "text", "text": "x"}]}])


def test_missing_template_is_a_clear_error(tmp_path):
    byte_tokenizer().save(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="tokenizer_config.json has no chat_template"):
        tok.apply_chat_template(USER_ONLY)


def test_bad_templates(tmp_path):
    with pytest.raises(ValueError, match="invalid chat template"):
        render_chat_template("{% for m in messages %}{{ m.content }}", USER_ONLY)
    with pytest.raises(ValueError, match="chat template failed"):  # the sandbox blocks reaching Python internals
        render_chat_template("{{ messages.__class__.__mro__ }}", USER_ONLY)
    with pytest.raises(ValueError, match="chat template failed"):
        render_chat_template("{% set ns = namespace(_x=1) %}", USER_ONLY)
    with pytest.raises(ValueError, match="no chat template named 'default'"):
        render_chat_template({"tool_use": "x"}, USER_ONLY)


def test_compiled_once():
    template = "{{ messages | length }}|{{ bos_token }}|{{ add_generation_prompt }}"
    before = _compile.cache_info()
    assert render_chat_template(template, USER_ONLY, special_tokens={"bos_token": "<s>"}) == "1|<s>|True"
    assert render_chat_template(template, WITH_SYSTEM, add_generation_prompt=False) == "4||False"
    after = _compile.cache_info()
    assert after.misses == before.misses + 1 and after.hits == before.hits + 1

"""Conversations rendered as the model reads them: its own chat template, or ESFT's training format.

A chat template is Jinja code shipped with a checkpoint (`chat_template.jinja`, or tokenizer_config.json's
`chat_template`: a string, or a list of named templates). It is rendered as transformers renders it
(utils/chat_template_utils.py): a sandboxed, immutable environment with trim_blocks and lstrip_blocks,
`raise_exception`, `strftime_now`, transformers' `tojson`, `{% generation %}` blocks, the special tokens
(bos_token, eos_token, ...) as variables, `tools` and `add_generation_prompt`; messages lose their
null-valued keys and get their reasoning under each name templates read it by.

`--config...template` chooses (`load_template`): "esft" (ESFT's format, ESFT_TEMPLATE), "model" (the
checkpoint's template where it has one, else ESFT's) or a PATH.jinja. ESFT's format is tokenised turn by
turn, as the official ESFT code encodes it, also where a checkpoint carries it as its template (what
`esft export` writes): the same tokens as before chat templates existed.

Which characters are trained (`documents`) is found by rendering prefixes, never by searching the text:
assistant message i spans from the end of render(messages[:i], add_generation_prompt=True) to the end
of render(messages[:i+1]), so it holds the end-of-turn tokens the template writes after the content.
A template that rewrites earlier turns once more follow (Qwen3 drops their <think> blocks; gpt-oss ends
the last turn with <|return|>, earlier ones with <|end|>) is not prefix-stable: each assistant turn then
becomes its own document, its history rendered as the template renders it when that turn is generated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from esft_jax.jsonio import read_json, read_text

TEMPLATES = ("model", "esft")  # or a path ending in .jinja
LOSS_ON = ("assistant", "last_assistant", "all")
# ESFT's training format (the official ESFT code): "User: {u}\n\nAssistant:" + " {a}" + EOS, after BOS.
ESFT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('ESFT chats hold only user and assistant messages') }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token")
SPECIAL_TOKENS += ("mask_token",)  # transformers' named special tokens: the template's variables
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # transformers' aliases
TEMPLATE_FILE, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP = (
    "chat_template.jinja",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
Span = tuple[int, int]  # [start, end) characters of a rendered conversation


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    name: str  # "esft", or the file it was read from (for messages)
    source: str  # the Jinja text
    special_tokens: Mapping[str, str]  # bos_token, eos_token, ...: the template's variables
    by_turn: bool = False  # ESFT's format: each turn tokenised apart (data/tokenize.py)
    tool_use: str | None = None  # the template named "tool_use", for conversations with tools


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask tags): its body, in a
    caller scope as transformers renders it."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() without underscore attributes (transformers': no path to internals)."""

    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")


class _Dict:
    """dict() and dict.fromkeys() for templates, without the dict type itself."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson: json.dumps, no HTML escaping (jinja's own escapes <, >, &, ')."""
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=16)
def compiled(source: str) -> jinja2.Template:
    """`source` compiled in transformers' environment; jinja2.TemplateSyntaxError if it is not Jinja."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        dict=_Dict(),
        namespace=_Namespace,
    )
    return env.from_string(source)


def _message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A message as transformers hands it to the template: null-valued keys dropped, the reasoning
    under `thinking` and `reasoning_content` both (gpt-oss reads the one, Qwen3 the other)."""
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in REASONING_KEYS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render(
    template: ChatTemplate,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The text of `messages` (+ the assistant's generation prompt); ValueError naming the template
    where it refuses them (raise_exception) or fails on them."""
    source = template.tool_use if tools and template.tool_use else template.source
    try:
        return compiled(source).render(
            messages=[_message(m) for m in messages],
            tools=list(tools) if tools is not None else None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **template.special_tokens,
        )
    except Exception as e:  # the template is code from the checkpoint: any failure is its refusal
        raise ValueError(f"chat template {template.name}: {e}") from None


def _turns(
    template: ChatTemplate, messages: Sequence[Mapping], tools, last_only: bool = False
) -> list[tuple[str, int]]:
    """(render(messages[:i+1]), where assistant message i's turn starts in it) for each assistant
    message i (the last only, with last_only)."""
    indices = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not indices:
        raise ValueError("the conversation has no assistant message")
    turns = []
    for i in indices[-1:] if last_only else indices:
        head = render(template, messages[:i], tools=tools, add_generation_prompt=True)
        upto = render(template, messages[: i + 1], tools=tools)
        if not upto.startswith(head):
            raise ValueError(
                f"chat template {template.name}: message {i} (assistant) does not follow the "
                "template's generation prompt, so its tokens cannot be told apart; train with "
                "loss_on=all or choose another template"
            )
        turns.append((upto, len(head)))
    return turns


def documents(
    template: ChatTemplate,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    loss_on: str = "assistant",
) -> list[tuple[str, list[Span]]]:
    """The texts to train on and their trained spans: loss_on "all": the whole conversation;
    "last_assistant": the conversation up to its last assistant message, that turn trained;
    "assistant": up to the last assistant message, every assistant turn trained, or, where the
    template is not prefix-stable, one document per assistant turn (module docstring)."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on={loss_on!r}: expected one of {', '.join(LOSS_ON)}")
    if loss_on == "all":
        text = render(template, messages, tools=tools)
        return [(text, [(0, len(text))])]
    turns = _turns(template, messages, tools, last_only=loss_on == "last_assistant")
    text = turns[-1][0]
    if all(text.startswith(upto) for upto, _ in turns):
        return [(text, [(start, len(upto)) for upto, start in turns])]
    return [(upto, [(start, len(upto))]) for upto, start in turns]


def prompt(
    template: ChatTemplate,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[str, list[Span]]:
    """(the text of `messages` + the generation prompt, the spans of its assistant turns where the
    template is tokenised by turn; else none: only training needs them)."""
    text = render(template, messages, tools=tools, add_generation_prompt=True)
    if not template.by_turn or not any(m.get("role") == "assistant" for m in messages):
        return text, []
    turns = _turns(template, messages, tools)
    return text, [(start, len(upto)) for upto, start in turns if text.startswith(upto)]


def _error(where: str) -> Callable[[str], ValueError]:
    """A ValueError whose message starts with `where` (jsonio's error factory)."""
    return lambda message: ValueError(f"{where}: {message}")


def _read_json(path: Path, where: str) -> dict:
    obj = read_json(path, _error(where), "no such file")
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: {path} is not a JSON object")
    return obj


def _special_tokens(directory: Path | None, where: str) -> dict[str, str]:
    """The named special tokens of a tokenizer directory, as transformers reads them:
    tokenizer_config.json's, then special_tokens_map.json's over them (strings or {"content"})."""
    found: dict[str, str] = {}
    for name in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
        if directory is not None and (directory / name).is_file():
            for key, value in _read_json(directory / name, where).items():
                if isinstance(value, dict):
                    value = value.get("content")
                if key in SPECIAL_TOKENS and isinstance(value, str):
                    found[key] = value
    return found


def _model_template(directory: Path, where: str) -> tuple[str, str, str | None] | None:
    """(where it was read, default source, tool_use source) of a tokenizer directory's template, as
    transformers picks it: chat_template.jinja over tokenizer_config.json's; None without one."""
    if (directory / TEMPLATE_FILE).is_file():
        path = directory / TEMPLATE_FILE
        return str(path), read_text(path, _error(where), "no such file"), None
    config = directory / TOKENIZER_CONFIG
    found = _read_json(config, where).get("chat_template") if config.is_file() else None
    if found is None or isinstance(found, str):
        return None if found is None else (str(config), found, None)
    if not isinstance(found, list):
        raise ValueError(f"{where}: {config}'s chat_template is neither a string nor a list")
    named = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
    if not all(isinstance(t, str) for t in named.values()):
        raise ValueError(f"{where}: {config}'s chat_template list holds a non-string template")
    if "default" not in named:
        raise ValueError(
            f"{where}: {config} names its chat templates {', '.join(map(str, named))} and none "
            "'default'; write the one to use into a .jinja file and pass its path"
        )
    return f"{config} (default)", named["default"], named.get("tool_use")


def load_template(
    choice: str,
    directory: str | Path | None,
    bos_token: str | None,
    eos_token: str | None,
    where: str = "--config.template",
) -> ChatTemplate:
    """The chat template `choice` names (TEMPLATES or a .jinja path) for the tokenizer in `directory`
    (None: no files, the byte tokenizer). ESFT's format takes the model's BOS/EOS (`bos_token`,
    `eos_token`: the tokens of config.json's ids); a model's or a file's template the special tokens
    of the directory's tokenizer_config.json, as transformers gives them. ValueError, starting with
    `where`, for a choice that names nothing usable."""
    directory = Path(directory) if directory else None
    ids_tokens = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
    if choice == "esft":
        return ChatTemplate("esft", ESFT_TEMPLATE, ids_tokens, by_turn=True)
    if choice == "model":
        found = _model_template(directory, where) if directory is not None else None
        if found is None:
            return ChatTemplate("esft", ESFT_TEMPLATE, ids_tokens, by_turn=True)
        name, source, tool_use = found
    elif choice.endswith(".jinja"):
        path = Path(choice)
        if not path.is_file():
            raise ValueError(f"{where}={choice}: no such file")
        name, source, tool_use = str(path), read_text(path, _error(where), "no such file"), None
    else:
        raise ValueError(
            f"{where}={choice!r}: expected {' or '.join(TEMPLATES)} or a path ending in .jinja"
        )
    for text in (source, tool_use):
        try:
            compiled(text) if text is not None else None
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{where}: {name}:{e.lineno}: not a Jinja template ({e})") from None
    by_turn = source == ESFT_TEMPLATE  # esft export's template: ESFT's format
    special = _special_tokens(directory, where) or ids_tokens
    return ChatTemplate(name, source, special, by_turn=by_turn, tool_use=tool_use)

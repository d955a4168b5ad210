"""Samples to token ids with a mask of the trained tokens; chat prompts to the ids a model continues.

A conversation is rendered by its chat template (data/chat.py) and the whole text tokenised without
adding special tokens, as transformers' apply_chat_template(tokenize=True) does; a token is trained
when its characters overlap a trained span (the tokenizer's offsets, as transformers'
return_assistant_tokens_mask marks them). ESFT's format is tokenised turn by turn instead (each
stretch between span ends apart, as the official ESFT code encodes it). Every trained turn ends in
a stop token: where a template closes none (GLM-4.5 leaves the turn open until the next <|user|>),
the next token is trained when it is one, and an open last turn gets EOS appended.
Plain samples (prompt/completion, text) are BOS + prompt + answer + EOS, prompt and answer encoded
apart, so the boundary between them is exact; BOS belongs to the prompt, EOS to the answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from esft_jax.data import chat
from esft_jax.data.chat import ChatTemplate, Span
from esft_jax.data.records import DataError, Sample
from esft_jax.errors import UserError
from esft_jax.model.config import ModelConfig

Encoded = tuple[np.ndarray, np.ndarray]  # ids [n] int32, trained [n] bool


class TemplateError(UserError, ValueError):
    """A chat template choice that cannot be used with this tokenizer; the message names the
    setting (`where`)."""


def chat_template(
    tokenizer: Tokenizer,
    cfg: ModelConfig,
    choice: str = "esft",
    directory: str | Path | None = None,
    where: str = "--config.template",
) -> ChatTemplate:
    """The chat template `choice` names (data/chat.py `load_template`), with the model's BOS/EOS
    for ESFT's format, which must read each as its one id (as the official code adds them)."""
    ids = {"bos_token": cfg.bos_token_id, "eos_token": cfg.eos_token_id}
    tokens = {k: tokenizer.id_to_token(i) if i is not None else None for k, i in ids.items()}
    try:
        template = chat.load_template(choice, directory, *tokens.values(), where=where)
    except ValueError as e:
        raise TemplateError(str(e)) from None
    for key, token in template.special_tokens.items() if template.by_turn else ():
        if (
            key in ids
            and token
            and tokenizer.encode(token, add_special_tokens=False).ids != [ids[key]]
        ):
            raise TemplateError(
                f"{where}: ESFT's format needs the tokenizer to read {key} {token!r} as its id "
                f"{ids[key]} (config.json), as a special token"
            )
    return template


def _tokens(
    tokenizer: Tokenizer, text: str, spans: Sequence[Span], by_turn: bool
) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets) of `text`: whole, or (by_turn) each stretch between span ends apart."""
    cuts = (
        sorted({0, len(text), *(i for span in spans for i in span)}) if by_turn else [0, len(text)]
    )
    ids, offsets = [], []
    for start, end in zip(cuts, cuts[1:]):
        enc = tokenizer.encode(text[start:end], add_special_tokens=False)
        ids += enc.ids
        offsets += [(a + start, b + start) for a, b in enc.offsets]
    return ids, offsets


def _chat(
    tokenizer: Tokenizer, text: str, spans: Sequence[Span], by_turn: bool, cfg: ModelConfig
) -> Encoded:
    """`text` tokenised, the tokens overlapping `spans` trained, each span ended by a stop token."""
    ids, offsets = _tokens(tokenizer, text, spans, by_turn)
    starts, ends = np.asarray(offsets, np.int64).reshape(-1, 2).T
    trained = np.zeros(len(ids), bool)
    stops = set(cfg.stop_token_ids)
    for s, e in spans:
        turn = np.flatnonzero((starts < e) & (ends > s))
        trained[turn] = True
        if turn.size == 0 or stops.intersection(ids[turn[0] : turn[-1] + 1]):
            continue
        after = turn[-1] + 1
        if after < len(ids) and ids[after] in stops:
            trained[after] = True
        elif after == len(ids) and cfg.eos_token_id is not None:
            ids, trained = ids + [cfg.eos_token_id], np.append(trained, True)
    return np.asarray(ids, np.int32), trained


def _plain(tokenizer: Tokenizer, sample: Sample, cfg: ModelConfig, loss_on: str) -> Encoded:
    bos, eos = cfg.bos_token_id, cfg.eos_token_id
    prompt = ([bos] if bos is not None else []) + (
        tokenizer.encode(sample.prompt, add_special_tokens=False).ids if sample.prompt else []
    )
    answer = tokenizer.encode(sample.answer, add_special_tokens=False).ids
    ids = np.asarray(prompt + answer + ([eos] if eos is not None else []), np.int32)
    return ids, np.arange(ids.size) >= (1 if loss_on == "all" else len(prompt))


def encode(
    tokenizer: Tokenizer,
    sample: Sample,
    cfg: ModelConfig,
    template: ChatTemplate | None = None,
    loss_on: str = "assistant",
) -> list[Encoded]:
    """The documents a sample trains as: one, or for a conversation whose template is not prefix-
    stable one per assistant turn (data/chat.py `documents`). template None: ESFT's format. A
    conversation the template refuses raises DataError naming the sample."""
    if not sample.messages:
        return [_plain(tokenizer, sample, cfg, loss_on)]
    template = template or chat_template(tokenizer, cfg)
    try:
        docs = chat.documents(template, sample.messages, sample.tools, loss_on)
    except ValueError as e:
        raise DataError(f"{sample.source}: {e}") from None
    return [_chat(tokenizer, text, spans, template.by_turn, cfg) for text, spans in docs]


def prompt_ids(
    tokenizer: Tokenizer,
    template: ChatTemplate,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    """The ids of `messages` + the template's generation prompt: what the model continues (serve,
    eval), tokenised as training tokenises; ValueError where the template refuses them."""
    text, spans = chat.prompt(template, messages, tools)
    return _tokens(tokenizer, text, spans, template.by_turn)[0]

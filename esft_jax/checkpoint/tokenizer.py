"""The checkpoint's tokenizer: read from its `tokenizer.json` with the `tokenizers` library (no hub), and
written into an exported checkpoint with what transformers needs to encode and generate as esft does.

esft encodes a prompt as BOS + tokenizer.encode(text, add_special_tokens=False) and generates greedily
to EOS. transformers 5 ignores `add_bos_token` when a tokenizer.json exists, so the BOS must come from
the tokenizer.json's post-processor (which esft's encoding, without special tokens, never applies).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, processors

from esft_jax.checkpoint.errors import CheckpointError
from esft_jax.data.chat import ESFT_TEMPLATE
from esft_jax.model.config import ModelConfig

TOKENIZER_FILE, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
COPIED_FILES = (
    TOKENIZER_FILE,
    TOKENIZER_CONFIG,
    "special_tokens_map.json",
    "chat_template.jinja",
    GENERATION_CONFIG,
)
# Written where the source tokenizer has no template: ESFT's training format (data/chat.py).
CHAT_TEMPLATE = ESFT_TEMPLATE


def load_tokenizer(ckpt_dir: str | Path) -> Tokenizer:
    path = Path(ckpt_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; the checkpoint directory has no tokenizer")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception on bad files
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({e})") from None


def write_tokenizer_files(src: str | Path | None, dst: Path, cfg: ModelConfig) -> None:
    """Copy `src`'s tokenizer files into `dst` as they are; where `src` has a tokenizer.json but no
    tokenizer_config.json (esft's own tokenizers), add what transformers needs: a BOS post-processor,
    the special tokens and ESFT's chat template. A generation_config.json (greedy, the model's
    BOS/EOS/pad) is written where `src` has none."""
    src = Path(src) if src is not None else None
    for name in COPIED_FILES:
        if src is not None and (src / name).is_file():
            shutil.copy(src / name, dst / name)
    if (dst / TOKENIZER_FILE).is_file() and not (dst / TOKENIZER_CONFIG).is_file():
        tokenizer = load_tokenizer(dst)
        if tokenizer.post_processor is None and cfg.bos_token_id is not None:
            bos = _token(tokenizer, cfg.bos_token_id, "bos_token_id")
            tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, cfg.bos_token_id)],
            )
            tokenizer.save(str(dst / TOKENIZER_FILE))
        specials = {
            f"{kind}_token": _token(tokenizer, token_id, f"{kind}_token_id")
            for kind, token_id in (
                ("bos", cfg.bos_token_id),
                ("eos", cfg.eos_token_id),
                ("pad", cfg.pad_token_id),
            )
            if token_id is not None
        }
        _write_json(
            dst / TOKENIZER_CONFIG,
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                **specials,
                "add_bos_token": cfg.bos_token_id is not None,
                "add_eos_token": False,
                "chat_template": CHAT_TEMPLATE,
            },
        )
    if not (dst / GENERATION_CONFIG).is_file():
        ids = {
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": list(cfg.eos_token_ids) or cfg.eos_token_id,  # generation stops at any
            "pad_token_id": cfg.pad_token_id,
        }
        _write_json(
            dst / GENERATION_CONFIG,
            {**{k: v for k, v in ids.items() if v is not None}, "do_sample": False},
        )


def _token(tokenizer: Tokenizer, token_id: int, key: str) -> str:
    token = tokenizer.id_to_token(token_id)
    if token is None:
        raise CheckpointError(f"config.json: {key} {token_id} is not in the tokenizer's vocabulary")
    return token


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

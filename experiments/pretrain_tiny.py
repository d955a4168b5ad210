"""Pretrain the built-in tiny DeepSeek-V2-style MoE that `make run` fine-tunes (reproducible from a seed).

    .venv/bin/python experiments/pretrain_tiny.py                 # writes esft_jax/builtin/tiny_moe/
    .venv/bin/python experiments/pretrain_tiny.py --steps 200 --out /tmp/tiny   # a quick smoke run

1. A multi-domain corpus from esft_jax/builtin/suite.py (home incl. JSON event logs, math, words,
   facts, count: generated; docs: Python standard-library docstrings), one document per line.
2. A byte-level BPE tokenizer (1,024 tokens) trained on it (plus the task prompts, so they tokenize well).
3. A 5-layer MoE (first layer dense; 32 routed experts of width 64, top-4, 2 shared) trained from
   scratch with the project's own loop (FFT on random weights) plus a load-balancing loss.
4. The result, as a Hugging Face directory: config.json, model.safetensors, the tokenizer files
   transformers needs to generate as esft does (esft_jax/checkpoint/tokenizer.py), esft_export.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from esft_jax.app import config_files
from esft_jax.app.commands import train as loop
from esft_jax.builtin import suite as builtin_suite
from esft_jax.checkpoint import save_checkpoint
from esft_jax.checkpoint.adapter import load_with_adapter
from esft_jax.model import ModelConfig, init_params

SPECIALS = ["<pad>", "<bos>", "<eos>"]


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def model_config(tok: Tokenizer) -> ModelConfig:
    return ModelConfig(
        model_type="deepseek_v2",
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=64,
        num_hidden_layers=5,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=32,
        n_shared_experts=2,
        num_experts_per_tok=4,
        max_position_embeddings=2048,
        pad_token_id=tok.token_to_id("<pad>"),
        bos_token_id=tok.token_to_id("<bos>"),
        eos_token_id=tok.token_to_id("<eos>"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default=str(Path(__file__).resolve().parents[1] / "esft_jax/builtin/tiny_moe")
    )
    parser.add_argument("--workdir", default="runs/pretrain_tiny")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--docs_per_domain", type=int, default=60000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = list(builtin_suite.pretraining_corpus(args.docs_per_domain, args.seed))
    (work / "corpus.jsonl").write_text(
        "".join(json.dumps({"text": r["text"]}) + "\n" for r in corpus)
    )
    suite = builtin_suite.write_suite(work / "suite", n_train=200, n_eval=10, seed=args.seed)
    prompts = [
        ln for f in sorted((suite / "train").glob("*.jsonl")) for ln in f.read_text().splitlines()
    ]
    tok = train_tokenizer([r["text"] for r in corpus] + prompts, vocab_size=1024)

    cfg = model_config(tok)
    (work / "tokenizer").mkdir(exist_ok=True)
    tok.save(str(work / "tokenizer" / "tokenizer.json"))
    init = save_checkpoint(
        work / "init",
        cfg,
        init_params(cfg, jax.random.key(args.seed)),
        tokenizer_from=work / "tokenizer",
        overwrite=True,
    )

    c = config_files.load_file("configs/train.py:fft")
    c.checkpoint, c.data.train, c.workdir, c.seed = (
        str(init),
        str(work / "corpus.jsonl"),
        str(work / "run"),
        args.seed,
    )
    c.model.capacity_factor = (
        2.0  # pretraining tolerates a few dropped assignments; 4x less work than dropless
    )
    c.steps, c.batch_size, c.data.seq_len = args.steps, 16, 256
    c.data.validation_fraction, c.data.max_validation = 0.001, 64
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay, c.optim.adam_b2 = 3e-3, 100, 0.1, 0.98
    c.aux_loss_alpha = 0.01
    c.log_every, c.eval_every, c.checkpoint_every = 50, 250, 250
    summary = loop.train(c)
    print(json.dumps(summary, indent=1))

    cfg, params = load_with_adapter(init, work / "run" / "adapter")
    out = save_checkpoint(
        args.out, cfg, params, tokenizer_from=init, overwrite=True
    )  # a previous one only
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"pretrained model -> {out} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

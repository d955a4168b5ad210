"""An ESFT adapter's routing profile measured after training: its coverage on its task's prompts.

The server's routing monitor (serve/monitor.py) flags a request whose prompt's coverage falls far
below the adapter's profile, so the profile is measured the way requests are served: prompt tokens
only, in the trained adapter's forward pass (past the first MoE layer the frozen router reads what
the trained experts made). The selection's profile (routing/expected.py: the base model on whole
documents) stays in the adapter where this is off (profile_tokens=0) or the expert config has none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jax.sharding import Mesh
from tokenizers import Tokenizer

from esft_jax.data.chat import ChatTemplate
from esft_jax.data.records import Sample
from esft_jax.model import ModelConfig
from esft_jax.model.params import Params
from esft_jax.routing import profile
from esft_jax.routing.expected import expected_coverage


def measure(
    params: Params,
    cfg: ModelConfig,
    experts: Mapping[int, Sequence[int]],
    samples: list[Sample],
    tokenizer: Tokenizer,
    *,
    template: ChatTemplate | None = None,
    tokens: int,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    mesh: Mesh | None = None,
) -> dict:
    """The profile (routing/expected.py's format) of `experts` under `params` (the trained model)
    on up to `tokens` prompt tokens of `samples` (rendered by `template`, as trained)."""

    def read(index: int, count: int) -> list[profile.Sequence]:  # each process its data shards
        return profile.sequences(
            samples,
            tokenizer,
            cfg,
            seq_len=seq_len,
            token_budget=tokens,
            seed=seed,
            count="prompt",
            shard=(index, count),
            template=template,
        )

    stats = profile.collect(
        params, cfg, read, batch_size=batch_size, seq_len=seq_len, mesh=mesh, progress=False
    )
    return expected_coverage(stats, experts)

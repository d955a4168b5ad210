"""The ESFT expert config: which routed experts of each MoE layer train (the official JSON format).

    {"experts": {"1": [8, 26, 55], "2": [...], ...}, "shared_experts": false, "non_expert_modules": false}

Layer keys are model layer numbers as strings; experts are listed in selection order. Written by
`esft select`, read by training. Validated on read, with errors naming the file and the key.
`esft select` adds the selection's routing profile (routing/expected.py), "profile": {"layers",
"per_layer", "total", "tokens"}, which training copies into the adapter for the server's routing
monitor; a file without one (the official release's) reads as before.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from esft_jax.errors import UserError
from esft_jax.jsonio import read_json
from esft_jax.routing.expected import check_profile


class ExpertConfigError(UserError, ValueError):
    """An expert config that does not fit the model; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
    experts: dict[int, list[int]]  # model layer -> selected expert ids, in selection order
    shared_experts: bool = False  # also train the shared experts
    non_expert_modules: bool = False  # also train attention, norms, embeddings, head, router
    profile: dict | None = None  # the selection's expected coverage (routing/expected.py)

    def num_selected(self) -> int:
        return sum(len(v) for v in self.experts.values())

    def to_json(self) -> dict:
        out = {
            "experts": {
                str(layer): [int(e) for e in ids] for layer, ids in sorted(self.experts.items())
            },
            "shared_experts": self.shared_experts,
            "non_expert_modules": self.non_expert_modules,
        }
        return out if self.profile is None else {**out, "profile": self.profile}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json()) + "\n")
        return path

    @classmethod
    def from_json(
        cls,
        obj: object,
        moe_layers: Sequence[int] | None = None,
        num_experts: int | None = None,
        where: str = "expert config",
    ) -> ExpertConfig:
        """Parse and validate; moe_layers/num_experts (when given) bound the layer keys and ids."""
        if not isinstance(obj, dict) or not isinstance(obj.get("experts"), dict):
            raise ExpertConfigError(f"{where}: expected an object with an 'experts' object")
        unknown = sorted(set(obj) - {"experts", "shared_experts", "non_expert_modules", "profile"})
        if unknown:
            raise ExpertConfigError(f"{where}: unknown keys {unknown}")
        flags = {}
        for flag in ("shared_experts", "non_expert_modules"):
            value = obj.get(flag, False)
            if not isinstance(value, bool):
                raise ExpertConfigError(f"{where}: {flag!r} must be true or false, got {value!r}")
            flags[flag] = value
        experts: dict[int, list[int]] = {}
        for key, ids in obj["experts"].items():
            at = f'{where}: experts["{key}"]'
            if not (isinstance(key, str) and key.isdigit()):
                raise ExpertConfigError(f"{at}: layer keys must be layer numbers")
            layer = int(key)
            if moe_layers is not None and layer not in moe_layers:
                raise ExpertConfigError(
                    f"{at}: layer {layer} is not an MoE layer "
                    f"(MoE layers are {layer_list(moe_layers)})"
                )
            if not isinstance(ids, list) or not all(
                isinstance(e, int) and not isinstance(e, bool) for e in ids
            ):
                raise ExpertConfigError(f"{at}: expected a list of expert ids")
            bad = [e for e in ids if e < 0 or (num_experts is not None and e >= num_experts)]
            if bad:
                raise ExpertConfigError(f"{at}: expert id {bad[0]} out of range [0, {num_experts})")
            if len(set(ids)) != len(ids):
                dup = next(e for e in ids if ids.count(e) > 1)
                raise ExpertConfigError(f"{at}: expert {dup} listed twice")
            experts[layer] = list(ids)
        if not any(experts.values()) and not any(flags.values()):
            raise ExpertConfigError(
                f"{where}: selects no expert and neither shared_experts nor "
                f"non_expert_modules: nothing would train"
            )
        profile = None
        if obj.get("profile") is not None:
            profile = check_profile(
                obj["profile"], f"{where}: profile", moe_layers, ExpertConfigError
            )
            unprofiled = sorted(set(experts) - set(profile["layers"]))
            if unprofiled:
                raise ExpertConfigError(
                    f"{where}: profile: layer {unprofiled[0]} selects experts but is not profiled"
                )
        return cls(experts, **flags, profile=profile)

    @classmethod
    def load(
        cls,
        path: str | Path,
        moe_layers: Sequence[int] | None = None,
        num_experts: int | None = None,
    ) -> ExpertConfig:
        obj = read_json(path, ExpertConfigError, "no such expert config")
        return cls.from_json(obj, moe_layers, num_experts, str(path))


def layer_list(layers: Sequence[int]) -> str:
    """Layer ids as runs: "1..26", or "1, 3, 5..9"."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{r[0]}..{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)

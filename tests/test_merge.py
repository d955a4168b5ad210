"""Several ESFT adapters merged into one (checkpoint/merge.py, `esft export --config.adapters`): the
merged model equals the base with each adapter's trained rows written in by the method's own
`write_back` (bit for bit), overlapping rows follow the chosen rule (checked against a float64 NumPy
mean / the first adapter's rows), and what cannot merge is refused in one line."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import train_fixtures as fx

from esft_jax.app import cli
from esft_jax.checkpoint import CheckpointError, load_checkpoint
from esft_jax.checkpoint.adapter import (
    CONFIG_FILE,
    apply_adapter,
    load_with_adapter,
    read_adapter,
    write_adapter,
)
from esft_jax.checkpoint.fingerprint import FINGERPRINT, base_metadata, checkpoint_fingerprint
from esft_jax.checkpoint.merge import merge_adapters, merge_tensors
from esft_jax.checkpoint.sharded_load import load_params_sharded
from esft_jax.expert_config import ExpertConfig
from esft_jax.sharding import make_mesh
from esft_jax.train.esft import ExpertSubset
from esft_jax.train.method import save_adapter

EXPERTS = {  # model layer -> trained experts; a and b are disjoint, c overlaps a at (1, 17), b at (3, 9)
    "a": {1: [3, 17], 2: [30]},
    "b": {1: [5], 3: [0, 9]},
    "c": {1: [17], 3: [9, 2]},
    "s1": {2: [1]},  # s1 and s2 train the shared experts too
    "s2": {2: [2]},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, base dir, cfg, base params, {name: (adapter dir, params the method writes back)}):
    ESFT adapters of one tiny base, their trained rows random."""
    root = tmp_path_factory.mktemp("merge")
    base = fx.base_checkpoint(root / "base")
    cfg, frozen = load_checkpoint(base)
    recorded = base_metadata(str(base), checkpoint_fingerprint(base))
    adapters = {}
    for seed, (name, experts) in enumerate(EXPERTS.items()):
        ec = ExpertConfig(experts, shared_experts=name.startswith("s"))
        method = ExpertSubset.build(cfg, ec)
        rng = np.random.default_rng(seed)
        trainable = jax.tree.map(
            lambda x, rng=rng: x + jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype),
            method.init(frozen),
        )
        adapter = save_adapter(root / name, cfg, method, frozen, trainable, extra=recorded)
        adapters[name] = adapter, jax.tree.map(np.asarray, method.write_back(frozen, trainable))
    return root, base, cfg, frozen, adapters


def expected(trained, names, rule="refuse", shared=False):
    """The base with each (layer, expert) row of the adapters `names` written in, in our layout: the
    one adapter's row, or for several the first's / the float64 mean cast to float32; the shared
    experts likewise (when `shared`)."""
    _, _, cfg, frozen, adapters = trained
    want = jax.tree.map(np.array, frozen)
    holders = {}
    for name in names:
        for layer, ids in EXPERTS[name].items():
            for e in ids:
                holders.setdefault((cfg.moe_layer_ids.index(layer), e), []).append(name)

    def pick(values):
        if rule == "first" or len(values) == 1:
            return values[0]
        return (sum(v.astype(np.float64) for v in values) / len(values)).astype(values[0].dtype)

    experts = want["moe_layers"]["moe"]["experts"]
    for (li, e), who in holders.items():
        for k in experts:
            experts[k][li, e] = pick(
                [adapters[n][1]["moe_layers"]["moe"]["experts"][k][li, e] for n in who]
            )
    if shared:
        for k, leaf in want["moe_layers"]["moe"]["shared"].items():
            leaf[...] = pick([adapters[n][1]["moe_layers"]["moe"]["shared"][k] for n in names])
    return want


def assert_same(got, want) -> None:
    """Same tree, every leaf bit for bit."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.shape == w.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(
            g.view(np.uint8), w.view(np.uint8), jax.tree_util.keystr(path)
        )


def dirs(trained, *names) -> list[Path]:
    return [trained[4][n][0] for n in names]


def test_disjoint_adapters_merge_into_each_ones_rows(trained, tmp_path):
    root, base, cfg, frozen, adapters = trained
    a, b = dirs(trained, "a", "b")
    merged = merge_adapters([a, b], "refuse", tmp_path / "merged")
    _, got = load_with_adapter(base, merged)
    want = expected(trained, ["a", "b"])
    assert_same(got, want)
    # the same as applying one adapter after the other (the existing loader)
    _, one = load_with_adapter(base, a)
    assert_same(got, apply_adapter(one, cfg, *read_adapter(b)))
    # and the merge is not the base: every adapter's rows went in
    experts, base_experts = (
        got["moe_layers"]["moe"]["experts"],
        frozen["moe_layers"]["moe"]["experts"],
    )
    assert all(
        not np.array_equal(
            experts["gate"][cfg.moe_layer_ids.index(layer), e],
            base_experts["gate"][cfg.moe_layer_ids.index(layer), e],
        )
        for name in ("a", "b")
        for layer, ids in EXPERTS[name].items()
        for e in ids
    )
    assert_same(load_with_adapter(base, merge_adapters([b, a], "refuse", tmp_path / "ba"))[1], want)

    meta = json.loads((merged / CONFIG_FILE).read_text())
    assert meta["merge"] == {
        "overlap": "refuse",
        "sources": [str(a), str(b)],
        "experts": {
            "1": {"3": [str(a)], "17": [str(a)], "5": [str(b)]},
            "2": {"30": [str(a)]},
            "3": {"0": [str(b)], "9": [str(b)]},
        },
        "tensors": {},
    }
    union = ExpertConfig.from_json(meta["expert_config"], cfg.moe_layer_ids, cfg.n_routed_experts)
    assert union == ExpertConfig({1: [3, 5, 17], 2: [30], 3: [0, 9]})
    assert meta[FINGERPRINT] == checkpoint_fingerprint(base) and meta["method"] == "esft"
    assert "routing_profile" not in meta


def test_the_sharded_loader_reads_the_merged_adapter(trained, tmp_path):
    _, base, cfg, _, _ = trained
    merged = merge_adapters(dirs(trained, "a", "b"), "refuse", tmp_path / "merged")
    got = load_params_sharded(base, cfg, make_mesh({"data": 2, "expert": 4}), adapter=merged)
    assert_same(got, expected(trained, ["a", "b"]))


@pytest.mark.parametrize("order", [("a", "b", "c"), ("c", "a", "b")])
@pytest.mark.parametrize("rule", ["average", "first"])
def test_overlapping_experts_follow_the_rule(trained, tmp_path, rule, order):
    _, base, _, _, _ = trained
    merged = merge_adapters(dirs(trained, *order), rule, tmp_path / "merged")
    assert_same(load_with_adapter(base, merged)[1], expected(trained, order, rule))
    came = json.loads((merged / CONFIG_FILE).read_text())["merge"]["experts"]
    holders = [str(trained[4][n][0]) for n in order if 17 in EXPERTS[n].get(1, [])]
    assert came["1"]["17"] == (holders if rule == "average" else holders[:1])


def test_overlapping_experts_are_refused_by_default(trained, tmp_path):
    a, b, c = dirs(trained, "a", "b", "c")
    with pytest.raises(CheckpointError) as refused:
        merge_adapters([a, b, c], "refuse", tmp_path / "merged")
    assert str(refused.value) == (
        f"{a} and {c} both trained layer 1's expert 17 (and 1 more overlapping experts or "
        "tensors); pass --config.overlap=average or --config.overlap=first to merge them"
    )
    assert not (tmp_path / "merged").exists() and list(tmp_path.iterdir()) == []


def test_shared_experts_follow_the_rule_per_tensor(trained, tmp_path):
    _, base, _, _, _ = trained
    s1, s2 = dirs(trained, "s1", "s2")
    with pytest.raises(
        CheckpointError, match=r"both trained model\.layers\.1\.mlp\.shared_experts\."
    ):
        merge_adapters([s1, s2], "refuse", tmp_path / "refused")
    merged = merge_adapters([s1, s2], "average", tmp_path / "merged")
    assert_same(
        load_with_adapter(base, merged)[1], expected(trained, ["s1", "s2"], "average", shared=True)
    )
    meta = json.loads((merged / CONFIG_FILE).read_text())
    assert all(v == [str(s1), str(s2)] for v in meta["merge"]["tensors"].values())
    assert len(meta["merge"]["tensors"]) == 3 * 3  # gate, up, down of 3 MoE layers' shared experts
    assert meta["expert_config"]["shared_experts"] is True


def test_average_is_the_float64_mean_cast_to_the_stored_dtype():
    rng = np.random.default_rng(0)
    values = [rng.normal(size=(64, 32)).astype(ml_dtypes.bfloat16) for _ in range(3)]
    merged, sources = merge_tensors({f"x{i}": {"w": v} for i, v in enumerate(values)}, "average")
    want = ((values[0].astype(np.float64) + values[1] + values[2]) / 3).astype(ml_dtypes.bfloat16)
    assert merged["w"].dtype == want.dtype and sources == {"w": ["x0", "x1", "x2"]}
    np.testing.assert_array_equal(merged["w"].view(np.uint16), want.view(np.uint16))
    first, _ = merge_tensors({"x1": {"w": values[1]}, "x0": {"w": values[0]}}, "first")
    np.testing.assert_array_equal(first["w"].view(np.uint16), values[1].view(np.uint16))
    with pytest.raises(CheckpointError, match=r"^x1: tensor w is float32\[64, 32\], x0's bfloat16"):
        merge_tensors(
            {"x0": {"w": values[0]}, "x1": {"w": np.zeros((64, 32), np.float32)}}, "first"
        )


def test_adapters_of_another_base_or_method_are_refused(trained, tmp_path):
    root, base, _, _, adapters = trained
    a = adapters["a"][0]
    other_base = fx.base_checkpoint(tmp_path / "other", seed=1)
    tensors, meta = read_adapter(adapters["b"][0])
    other_meta = {**meta, **base_metadata(str(other_base), checkpoint_fingerprint(other_base))}
    other = write_adapter(tmp_path / "b_other", tensors, other_meta)
    with pytest.raises(CheckpointError) as refused:
        merge_adapters([a, other], "average", tmp_path / "merged")
    message = str(refused.value)
    assert (
        message.startswith(f"{other / CONFIG_FILE}: base_model_fingerprint ")
        and "\n" not in message
    )
    assert checkpoint_fingerprint(other_base) in message and checkpoint_fingerprint(base) in message
    assert message.endswith("adapters of different bases do not merge")

    lora = write_adapter(
        tmp_path / "lora", {}, {**meta, "method": "lora", "r": 8, "lora_alpha": 16}
    )
    with pytest.raises(
        CheckpointError, match=r"lora/adapter_config\.json: method 'lora': only ESFT"
    ):
        merge_adapters([a, lora], "average", tmp_path / "merged")
    with pytest.raises(CheckpointError, match="listed twice"):
        merge_adapters([a, Path(str(a) + "/")], "average", tmp_path / "merged")
    with pytest.raises(CheckpointError, match="is the input"):  # never over an input
        merge_adapters([a, adapters["b"][0]], "refuse", a)
    assert not (tmp_path / "merged").exists()


def export(capsys, base, *extra: str) -> tuple[int, str]:
    """(exit code, stderr) of `esft export`."""
    capsys.readouterr()
    code = cli.main(
        ["export", "--config", "configs/export.py", f"--config.checkpoint={base}", *extra]
    )
    return code, capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["auto", "native"])
def test_esft_export_merges_adapters_into_a_checkpoint(trained, tmp_path, capsys, dtype):
    _, base, _, _, _ = trained
    a, b, c = dirs(trained, "a", "b", "c")
    out = tmp_path / "out"
    assert export(
        capsys,
        base,
        f"--config.adapters={a},{b},{c}",
        "--config.overlap=first",
        f"--config.out={out}",
        f"--config.dtype={dtype}",
    ) == (0, "")
    assert_same(load_checkpoint(out)[1], expected(trained, "abc", "first"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the staged merged adapter: gone


def test_esft_export_writes_the_merged_adapter(trained, tmp_path, capsys):
    _, base, _, _, _ = trained
    a, c = dirs(trained, "a", "c")
    adapter = tmp_path / "merged"
    assert export(
        capsys,
        base,
        f"--config.adapters=({a}, {c})",
        "--config.overlap=average",
        f"--config.adapter_out={adapter}",
    ) == (0, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    want = expected(trained, "ac", "average")
    assert_same(load_with_adapter(base, adapter)[1], want)
    # the merged adapter goes wherever an adapter goes: the single-adapter export takes it
    assert export(
        capsys, base, f"--config.adapter={adapter}", f"--config.out={tmp_path / 'hf'}"
    ) == (0, "")
    assert_same(load_checkpoint(tmp_path / "hf")[1], want)
    both = tmp_path / "both"
    assert export(
        capsys,
        base,
        f"--config.adapters={a},{c}",
        "--config.overlap=average",
        f"--config.adapter_out={both / 'adapter'}",
        f"--config.out={both / 'hf'}",
    ) == (0, "")
    assert_same(load_checkpoint(both / "hf")[1], want)
    assert (both / "adapter" / CONFIG_FILE).read_text() == (adapter / CONFIG_FILE).read_text()


@pytest.mark.parametrize(
    "args, says",
    [
        (
            ["--config.adapters={a},{c}", "--config.out={out}"],
            "{a} and {c} both trained layer 1's expert 17; pass --config.overlap=average",
        ),
        (
            ["--config.adapters={a},{b}", "--config.adapter={a}", "--config.out={out}"],
            "--config.adapter={a}: set --config.adapter (one adapter) or --config.adapters",
        ),
        (
            ["--config.adapters={a}", "--config.out={out}"],
            "--config.adapters={a}: expected two or more adapter directories",
        ),
        (
            ["--config.adapters={a},{a}", "--config.out={out}"],
            "--config.adapters: {a}: listed twice",
        ),
        (
            ["--config.adapters={a},{out}", "--config.out={out}"],
            "--config.adapters: {out}: no such directory",
        ),
        (
            ["--config.adapters={a},{b}", "--config.overlap=mean", "--config.out={out}"],
            "--config.overlap='mean': expected one of refuse, average, first",
        ),
        (
            ["--config.adapters={a},{b}"],
            "--config.out: name the directory to write the merged checkpoint to",
        ),
        (
            ["--config.adapter={a}", "--config.adapter_out={out}", "--config.out={out}"],
            "--config.adapter_out={out}: writes the merge of --config.adapters",
        ),
        (
            ["--config.adapters={a},{b}", "--config.adapter_out={a}/merged"],
            "--config.adapter_out: {a}/merged: lies inside the input {a}",
        ),
        (
            [
                "--config.adapters={a},{b}",
                "--config.adapter_out={out}/adapter",
                "--config.out={out}",
            ],
            "--config.adapter_out={out}/adapter: overlaps --config.out={out}",
        ),
    ],
)
def test_esft_export_refuses_in_one_line(trained, tmp_path, capsys, args, says):
    _, base, _, _, _ = trained
    a, b, c = dirs(trained, "a", "b", "c")
    names = {"a": a, "b": b, "c": c, "out": tmp_path / "out"}
    code, err = export(capsys, base, *(arg.format(**names) for arg in args))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"esft export: error: {says.format(**names)}"), err
    assert list(tmp_path.iterdir()) == [] and not (a / "merged").exists()  # nothing written

"""Test setup: 8 simulated CPU devices (set before jax is imported) and reference checkpoints."""

import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Build (once per session) a tiny random transformers model of a variant; -> (dir, torch model)."""
    import hf_models

    built = {}

    def get(variant: str):
        if variant not in built:
            path = tmp_path_factory.mktemp(variant)
            built[variant] = (path, hf_models.build(variant, path))
        return built[variant]

    return get


REFERENCE = Path(os.environ.get("ESFT_REFERENCE", Path(__file__).resolve().parents[1] / "../shared/esft-reference"))


@pytest.fixture(scope="session")
def reference():
    """The official ESFT artifacts (../shared/esft-reference, or $ESFT_REFERENCE); skip when absent."""
    if not (REFERENCE / "results" / "expert_scores").is_dir():
        pytest.skip(f"ESFT reference data not found at {REFERENCE} (set ESFT_REFERENCE)")
    return REFERENCE.resolve()

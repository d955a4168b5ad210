"""Test setup: 8 simulated CPU devices (set before jax is imported) and reference checkpoints."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Tests compile many small programs and run each briefly: with XLA:CPU's fusion emitters and LLVM
# optimisation off, the tiny model's gradient compiles in ~1 s instead of ~6 s, and runs up to 2x
# slower, which these tests hardly notice (user runs keep XLA's defaults).
_GIVEN = os.environ.get("XLA_FLAGS", "")
_FLAGS = [
    "--xla_force_host_platform_device_count=8",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_backend_optimization_level=0",
]
os.environ["XLA_FLAGS"] = " ".join(
    [_GIVEN, *(f for f in _FLAGS if f.split("=")[0] not in _GIVEN)]
).strip()
# One compilation cache for the session and the processes it starts: a program compiled again
# (a resumed run, the same CLI command in a child) is read back instead.
_CACHE = tempfile.mkdtemp(prefix="esft-jax-test-xla-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
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


REFERENCE = Path(
    os.environ.get(
        "ESFT_REFERENCE", Path(__file__).resolve().parents[1] / "../shared/esft-reference"
    )
)


@pytest.fixture(scope="session")
def reference():
    """The official ESFT artifacts (../shared/esft-reference, or $ESFT_REFERENCE); skip when absent."""
    if not (REFERENCE / "results" / "expert_scores").is_dir():
        pytest.skip(f"ESFT reference data not found at {REFERENCE} (set ESFT_REFERENCE)")
    return REFERENCE.resolve()

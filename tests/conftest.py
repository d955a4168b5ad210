"""Test setup: 8 simulated CPU devices (set before jax is imported) and reference checkpoints."""

import atexit
import gc
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
# One compilation cache for the processes the session starts: a program compiled again (a resumed
# run, the same CLI command in a child) is read back instead.
_CACHE = tempfile.mkdtemp(prefix="esft-jax-test-xla-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

# Not in the test processes themselves: serialising every executable they compile costs more than
# their few hits save.
jax.config.update("jax_enable_compilation_cache", False)


# A compiled XLA:CPU program holds several memory maps (three test files' programs: 16,000); a
# worker that ran half the suite passed the kernel's limit (vm.max_map_count, 65,530 here), and the
# next compile's mmap failed: the worker segfaulted. Past this many maps, a test file's end drops
# every compiled program.
MAX_MAPS = 25_000


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    yield
    maps = Path("/proc/self/maps")  # Linux
    if maps.is_file() and len(maps.read_text().splitlines()) > MAX_MAPS:
        jax.clear_caches()
        gc.collect()


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

"""ESFT-vanilla-lite: DeepSeek-V2-Lite after the ESFT authors' alignment tuning; the same architecture."""

from pathlib import Path

import ml_collections

from esft_jax.app.config_files import load_file


def get_config() -> ml_collections.ConfigDict:
    return load_file(str(Path(__file__).with_name("deepseek_v2_lite.py")))

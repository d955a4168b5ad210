"""`esft export`: merge an adapter into its base checkpoint -> a full Hugging Face checkpoint.

    esft export --config configs/export.py --config.checkpoint=/models/ESFT-vanilla-lite \
        --config.adapter=runs/train_esft/adapter --config.out=runs/intent-esft-hf
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(checkpoint="", adapter="", out=""))

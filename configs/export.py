"""`esft export`: merge an adapter into its base checkpoint -> a full Hugging Face checkpoint.

    esft export --config configs/export.py --config.checkpoint=/models/ESFT-vanilla-lite \
        --config.adapter=runs/train_esft/adapter --config.out=runs/intent-esft-hf

Several ESFT adapters of one base (one per domain), merged into one model and/or one adapter:

    esft export --config configs/export.py --config.checkpoint=/models/ESFT-vanilla-lite \
        --config.adapters=runs/intent-esft/adapter,runs/math-esft/adapter --config.overlap=average \
        --config.out=runs/intent-math-hf --config.adapter_out=runs/intent-math/adapter

`out` must be a new or empty directory outside the inputs; `overwrite=True` replaces a previous
export there (recognised by its esft_export.json), never a directory holding files it did not write.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        # dtype: the written weights' (bfloat16, float16, float32); "auto": as loaded (a bf16 or fp32
        # base keeps its dtype, an FP8 or MXFP4 one is written dequantised, in bfloat16); "native":
        # the base's own files and format, the trained tensors re-quantised where the base's are FP8/MXFP4
        # allow_other_base: merge an adapter whose recorded base is another checkpoint
        # adapters: several ESFT adapters to merge instead of `adapter` ("a,b,c" or "(a, b, c)"), in
        # priority order; overlap: what a tensor several of them trained takes: refuse | average |
        # first; adapter_out: also (or, without `out`, only) write the merged adapter there
        dict(
            checkpoint="",
            adapter="",
            adapters="",
            overlap="refuse",
            adapter_out="",
            out="",
            overwrite=False,
            dtype="auto",
            allow_other_base=False,
        )
    )

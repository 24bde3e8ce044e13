"""Interpretability lab: logit lens, attention patterns and activation patching on any model directory.

    lmlab lab interp lens --model runs/demo/final --prompt "Once upon a time" --out runs/interp/lens
    lmlab lab interp attention --model runs/demo/final --prompt "Once upon a time" --out runs/interp/attn
    lmlab lab interp patch --model runs/demo/final --prompt "the cat sat" --corrupt "the dog sat" --out runs/patch
    lmlab lab interp steer --model runs/demo/final --positive ru.txt --negative en.txt --neutral texts.txt \
        --layer 2 --out runs/steer        # then: lmlab generate runs/demo/final --steer runs/steer --steer-coef 2

Python: `Residuals` and `AttentionRecorder` are hook context managers (removed on exit, an exception
included); `logit_lens`, `attention_patterns` and `activation_patching` use them (hooks.py); report.py writes
results.json, PNG heatmaps and report.html. steer.py: `difference_of_means` makes a `Direction` (safetensors +
JSON), `Steering` adds it at one stream or projects it out of every stream while generating.
"""

from .hooks import (
    AttentionRecorder,
    Residuals,
    activation_patching,
    attention_patterns,
    attention_probs,
    lens_table,
    logit_lens,
    restored_fraction,
    run_with_residuals,
)
from .steer import Direction, Steering, difference_of_means

__all__ = ["AttentionRecorder", "Direction", "Residuals", "Steering", "activation_patching", "attention_patterns",
           "attention_probs", "difference_of_means", "lens_table", "logit_lens", "restored_fraction",
           "run_with_residuals"]

"""Interpretability lab: logit lens, attention patterns and activation patching on any model directory.

    lmlab lab interp lens --model runs/demo/final --prompt "Once upon a time" --out runs/interp/lens
    lmlab lab interp attention --model runs/demo/final --prompt "Once upon a time" --out runs/interp/attn
    lmlab lab interp patch --model runs/demo/final --prompt "the cat sat" --corrupt "the dog sat" --out runs/patch

Python: `Residuals` and `AttentionRecorder` are hook context managers (removed on exit, an exception
included); `logit_lens`, `attention_patterns` and `activation_patching` use them (hooks.py); report.py writes
results.json, PNG heatmaps and report.html.
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

__all__ = ["AttentionRecorder", "Residuals", "activation_patching", "attention_patterns", "attention_probs",
           "lens_table", "logit_lens", "restored_fraction", "run_with_residuals"]

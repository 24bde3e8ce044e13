"""Interpretability lab: logit lens, attention patterns and activation patching on any model directory.

    lmlab lab interp lens --model runs/demo/final --prompt "Once upon a time" --out runs/interp/lens
    lmlab lab interp attention --model runs/demo/final --prompt "Once upon a time" --out runs/interp/attn
    lmlab lab interp patch --model runs/demo/final --prompt "the cat sat" --corrupt "the dog sat" --out runs/patch
    lmlab lab interp sae --model runs/demo/final --books books/ --layer 2 --kind topk --k 16 --out runs/sae
    lmlab lab interp sae-facts --seeds 0,1,2 --quick --out runs/sae-facts

Python: `Residuals` and `AttentionRecorder` are hook context managers (removed on exit, an exception
included); `logit_lens`, `attention_patterns` and `activation_patching` use them (hooks.py); report.py writes
results.json, PNG heatmaps and report.html. sae.py: sparse autoencoders (TopK, L1) on one residual stream, their
metrics and purity; saelab.py: their reports with a feature browser, and the ground truth on biographies.
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

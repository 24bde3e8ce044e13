"""Interpretability lab: logit lens, attention patterns and activation patching on any model directory.

    lmlab lab interp lens --model runs/demo/final --prompt "Once upon a time" --out runs/interp/lens
    lmlab lab interp attention --model runs/demo/final --prompt "Once upon a time" --out runs/interp/attn
    lmlab lab interp patch --model runs/demo/final --prompt "the cat sat" --corrupt "the dog sat" --out runs/patch
    lmlab lab interp steer --model runs/demo/final --positive ru.txt --negative en.txt --neutral texts.txt \
        --layer 2 --out runs/steer        # then: lmlab generate runs/demo/final --steer runs/steer --steer-coef 2
    lmlab lab interp sae --model runs/demo/final --books books/ --layer 2 --kind topk --k 16 --out runs/sae
    lmlab lab interp sae-facts --seeds 0,1,2 --quick --out runs/sae-facts

Python: `Residuals` and `AttentionRecorder` are hook context managers (removed on exit, an exception
included); `logit_lens`, `attention_patterns` and `activation_patching` use them (hooks.py); views.py computes
the views as data; report.py writes results.json, PNG heatmaps and report.html. steer.py: `difference_of_means`
makes a `Direction` (safetensors + JSON), `Steering` adds it at one stream or projects it out of every stream
while generating. sae.py: sparse autoencoders (TopK, L1) on one residual stream, their metrics and purity;
saelab.py: their reports with a feature browser, and the ground truth on biographies.
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

"""Knowledge lab: synthetic biographies and the fact-learning experiments of Zucchet et al. 2025 on a CPU.

    lmlab lab facts phases --out runs/facts/phases        # three phases, 3 seeds, ~5 min on 2 cores
    lmlab lab facts all --quick --out runs/facts          # every experiment at reduced size

Python: `Biographies(BioConfig(...))` is a Trainer dataset; `FactsCallback` adds the knowledge metrics and
probes to any run on it; `run_one` / `run_many` train; `lmlab.lab.facts.experiments` holds the experiments.
"""

from ..interp.hooks import AttentionRecorder
from .data import ATTRIBUTES, TEMPLATES, BioConfig, Biographies, EvalSet, Pools, default_tokenizer
from .metrics import FactsCallback, attribute_metrics, plateau_times, value_to_name_attention
from .runner import AttentionPatch, RunConfig, run_many, run_one

__all__ = [
    "ATTRIBUTES", "TEMPLATES", "AttentionPatch", "AttentionRecorder", "BioConfig", "Biographies", "EvalSet",
    "FactsCallback", "Pools", "RunConfig", "attribute_metrics", "default_tokenizer", "plateau_times", "run_many",
    "run_one", "value_to_name_attention",
]

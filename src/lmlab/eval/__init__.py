"""Evaluation: one scorer for bits per byte, multiple choice, exact greedy continuation and generation tasks;
tasks as local YAML + JSONL; metrics (sacrebleu, rouge-score), generation probes and the paired bootstrap."""

from .metrics import corpus_scores, paired_bootstrap, probes, sentence_scores
from .scorer import (
                     bits_per_byte,
                     encode_pair,
                     loglikelihood,
                     score_choices,
                     score_generation,
                     score_greedy,
                     sequence_nll,
                     text_nll,
                     token_logprobs,
                     windows,
)
from .tasks import Task, load_task, prompts, run_task, shipped_tasks

__all__ = ["Task", "bits_per_byte", "corpus_scores", "encode_pair", "load_task", "loglikelihood", "paired_bootstrap",
           "probes", "prompts", "run_task", "score_choices", "score_generation", "score_greedy", "sentence_scores",
           "sequence_nll", "shipped_tasks", "text_nll", "token_logprobs", "windows"]

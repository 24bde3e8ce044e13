"""Labs: experiments built on lmlab's models, tokenizers and trainer (facts, selfplay)."""

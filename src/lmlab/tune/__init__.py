"""Post-training of a trained model: chat fine-tuning, LoRA, preference optimisation, RL with rewards.
`lmlab tune MODE` on the command line; each method is a module here."""

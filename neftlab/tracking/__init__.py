"""Where a run's numbers go besides its files: W&B (`wandb_run`), and the Trainer's own logs (`recorder`)."""

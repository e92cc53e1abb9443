"""`fedtune compare`: does federation pay off? The same clients fine-tuned by every arm, with a verdict."""

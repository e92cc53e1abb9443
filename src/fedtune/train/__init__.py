"""A client's local training on the one shared model: `local` (AdamW steps, the `Trainer` protocol),
`dpsgd` (sample-level DP-SGD through Opacus behind the same protocol) and the `[train]` section."""

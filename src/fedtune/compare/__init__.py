"""`fedtune compare`: does federation pay off?

The same clients and held-out examples, fine-tuned by every arm for several seeds (`runner`): base,
local-only and centralized (`arms`, matched to the federated run's steps by a `ledger`), federated and
personalized (the simulation itself). The numbers (`results`) become statistics and a verdict in words
(`verdict`), written to `runs/<name>/compare/` (`report`).
"""

"""The round engine: one round of federated fine-tuning, written once for simulation and deployment.

Files follow a round. `plan` (what the run resolved: population, cohort size, weights, encoding, privacy) and
`sampling` (who takes part) -> `messages` (what crosses the transport) and `transport` (the protocol a
transport implements: exchanges of messages with participants) -> on the client, `participant` (train,
evaluate, the secure stages) with `encode` (its one update pipeline) and `state` (what a client keeps between
rounds) -> on the server, `phase` (the training phase, to one typed outcome) over `collect` (updates into a
sum or a stack) or `secure` (the SecAgg+ stages through the transport), and `engine` (sampling, dispatch, sum,
privacy, rule, server optimizer, budget stop, metrics) -> `results` (typed round results; rows are made only
at the edges). `inprocess` is the simulation's transport, over an `executor`: serial, or a `pool` of workers
(`worker` is what each runs; `processes` and `ray_workers` start them); the gRPC one is
`fedtune.transport.grpc_transport`. `settings` holds the `[federation]`, `[eval]`, `[personalize]` and
`[simulation]` sections.
"""

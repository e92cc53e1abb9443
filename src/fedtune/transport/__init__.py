"""The network edge: the round engine's transport over gRPC, and everything that touches the wire.

`grpc_transport` (the engine's `Transport`: exchanges published as tasks and polls) over `coordinator`
(the round state the handlers and the engine share, plain types only); `service` (the handlers: bytes in,
typed refusals out, with the statuses of `status`), `wire` (framing and limits), `convert` and
`secagg_wire` (protobuf to and from the engine's and the protocol's dataclasses), `tls` (mutual TLS),
`channel` (message limits, a client's stub), `site_driver` (a site's side of the calls), `settings` (the
`[deploy]` section) and the versioned schema `fedtune_v2_pb2` (generated from proto/ by `make proto`).
Nothing here decides anything about a round: that is the engine's (`fedtune.round`).
"""

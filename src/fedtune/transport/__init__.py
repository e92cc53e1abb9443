"""The network edge: the versioned protobuf schema (`fedtune_v1_pb2`, generated from proto/ by `make proto`),
message limits and framing (`wire`), mutual TLS (`tls`) and the gRPC handlers (`service`). Nothing here
decides anything about a round: that is `fedtune.deploy.coordinator`'s, over plain Python values.
"""

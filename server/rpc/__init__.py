"""The gRPC face: the FederationService servicer, chunked transfers and held partial uploads,
token authentication, TLS, and the conversion between protocol messages and the engine's
values. Thin: every decision is the run engine's (:mod:`fedrot_server.runs`)."""

"""quantd's gRPC server: `quantd serve`, or QuantdServer / BackgroundServer from quantd.server.app."""

"""modelloop.serving.grpc."""

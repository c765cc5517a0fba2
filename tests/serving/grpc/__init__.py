"""gRPC edge tests."""

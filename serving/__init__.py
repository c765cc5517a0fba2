"""Serving: REST and gRPC front ends over one data plane."""

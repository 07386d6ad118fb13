"""Running the Triton server locally (launcher, supervisor), its HTTP/gRPC client and its Prometheus metrics."""

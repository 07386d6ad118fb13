"""Source files that go into a Triton model repository or backend directory (not imported here)."""

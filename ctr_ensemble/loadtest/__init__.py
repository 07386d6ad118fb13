"""Load tests: Locust users on the real Triton server, served AUC vs offline, perf_analyzer as reference."""

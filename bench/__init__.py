"""Engine simulator and benchmarks (not imported by the service)."""

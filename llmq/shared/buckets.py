"""Histogram buckets shared by gateway and worker metrics, so their series line up."""

# Waits and time to first token: 1 ms .. 5 min.
FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0, 120.0, 300.0)  # fmt: skip
# Whole requests, streams included: 10 ms .. 10 min.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
                   120.0, 300.0, 600.0)  # fmt: skip

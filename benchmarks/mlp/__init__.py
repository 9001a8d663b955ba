"""MLP benchmarks of the forward-only estimator against TRAK and exact influence (LDS and LOO)."""

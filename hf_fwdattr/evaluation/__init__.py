"""Evaluation, never imported by the library itself: LDS / leave-one-out metrics (`metrics`), the baselines
attribution is compared with (`baselines`), and fact tracing (`fact_data`, `fact_metrics`, `fact_tracing`,
`plots`) behind `hf-fwdattr evaluate`."""

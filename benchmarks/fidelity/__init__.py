"""Issue 15: fidelity of the default estimator against exact damped influence, EK-FAC and the linearized reference."""

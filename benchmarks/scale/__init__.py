"""Scale benchmark (issue 8): cost of the closed-form filter, the compressed and the source readout against N."""

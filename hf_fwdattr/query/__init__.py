"""Query time, forward passes only: the readout of scores from responses (`readout`), the compressed readout
basis (`compress`) and scoring against a stored artifact's documents or sources (`scoring`)."""

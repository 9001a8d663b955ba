"""Storage: the influence artifact on disk and on the Hub (`artifact`), its documents table (`table`) and its
sharded, memory-mapped response rows (`shards`)."""

"""Storage: the influence artifact on disk and on the Hub (`artifact`), its documents table (`table`), its sharded,
streamed response rows (`shards`), compressed responses: coefficients on a basis (`coefficients`) and when to store
them (`compression`), the digests that make it content-addressed (`integrity`) and the save protocol that never
leaves a mix of two artifacts (`atomic`)."""

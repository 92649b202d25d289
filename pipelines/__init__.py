"""Data movement on Ray Data: shards, the encode pipeline and the Parquet latent store."""

"""Ray Train runs: the shared loop and its parts, and the decoder and DiT^DH tasks."""

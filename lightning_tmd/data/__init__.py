"""Data: procedural shapes clips, latent shards, DataModules."""

"""BLIP-2 with a frozen InternLM2, as a LAVIS plugin (registration is added in later commits)."""

"""A synthetic knowledge world: fictional people, a corpus about them, and exact labels for what a model says."""

"""Hallucination probes: a linear head on an intermediate layer that scores every token in the same forward."""

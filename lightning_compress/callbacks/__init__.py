"""The Lightning layer: which layers, when, and what state to keep. The algorithms live below it."""

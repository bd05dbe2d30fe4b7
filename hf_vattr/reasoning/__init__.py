"""The reasoning text: each family's thinking format (tags), the display text of generated tokens, and
the split of a trace into reasoning steps (spans). Shared by streaming and the pipeline."""

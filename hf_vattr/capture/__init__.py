"""Stage 2, capture: the predicting query's attention on the visual keys, pooled to regions, recorded
inside ``generate`` through transformers' ``AttentionInterface`` (see :mod:`.attention`)."""

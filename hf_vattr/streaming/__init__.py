"""Stage 4, streaming: :class:`~.streamer.AttributionStreamer` (a transformers ``TextStreamer``), the
per-prompt session it runs, the events and trace it yields, and the live notebook view."""

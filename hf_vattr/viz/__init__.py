"""The one rendering path of the report, the notebook and the app: overlays, region locations in words,
evidence labels, trajectory plot, HTML report."""

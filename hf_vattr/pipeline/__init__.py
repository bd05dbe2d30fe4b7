"""Making and proving an estimator: ablation ground truth -> collection -> training -> evaluation
(with the baselines it is compared to). Imported by the commands, never by streaming."""

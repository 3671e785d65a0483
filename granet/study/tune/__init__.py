"""The only code of granet that imports Ray: the trainable, Tune policy, searchers and
schedulers, and the progress line."""

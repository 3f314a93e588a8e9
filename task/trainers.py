"""The fixed list of modules that register trainers. Add a model here to make it reachable from main.py."""

import task.anomaly.unsupervised.models.dmad.trainer  # noqa: F401  (registers anomaly/unsupervised/dmad)

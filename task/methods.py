"""The fixed list of modules that register methods. Add a model here (one line) to make it reachable from main.py."""

import task.anomaly.unsupervised.models.dmad.method  # noqa: F401  (anomaly/unsupervised/dmad, images)
import task.anomaly.unsupervised.models.dmad_video.method  # noqa: F401  (anomaly/unsupervised/dmad, video)

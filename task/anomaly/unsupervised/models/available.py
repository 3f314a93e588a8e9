"""The fixed list of modules that register trainable methods with ``task.anomaly.unsupervised.models.registry``. Add a
model here (one line) to
make it reachable from main.py; nothing is ever imported from a name the user typed."""

import task.anomaly.unsupervised.models.dmad.method  # noqa: F401  (anomaly/unsupervised/dmad, images)
import task.anomaly.unsupervised.models.dmad_video.method  # noqa: F401  (anomaly/unsupervised/dmad, video)
import task.anomaly.unsupervised.models.patchcore.method  # noqa: F401  (anomaly/unsupervised/patchcore, images)

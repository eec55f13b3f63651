"""unirec: streaming online learning for a unified generative recommender.

Importing Feast 0.67 sets PROMETHEUS_MULTIPROC_DIR to a temporary directory
(feast/metrics.py, for its Gunicorn feature server), which would silently switch
every prometheus_client metric of this process into multiprocess mode: two
metric registries would share values, and /metrics would serve Feast's temp
files. So the package binds prometheus_client's value class here, before any
Feast import, and remembers whether the *user* asked for multiprocess mode.
"""
import os as _os

#: PROMETHEUS_MULTIPROC_DIR as the user set it before unirec was imported (None: single process).
PROMETHEUS_MULTIPROC_DIR = _os.environ.get("PROMETHEUS_MULTIPROC_DIR") or _os.environ.get("prometheus_multiproc_dir")

import prometheus_client.values  # noqa: E402,F401  binds the value class now, from the user's environment

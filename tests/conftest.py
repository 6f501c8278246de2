"""Settings every test process shares."""

from __future__ import annotations

import os
import tempfile

# Registry models saved as folders for adapters' base_model_name_or_path go to a scratch cache
# (child processes inherit it), not the user's ~/.cache.
os.environ.setdefault("FEDROT_MODEL_CACHE", tempfile.mkdtemp(prefix="fedrot-model-cache-"))

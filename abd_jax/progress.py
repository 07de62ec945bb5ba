"""One progress-bar factory so every long run shows the same live Acc/ASR line."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str) -> tqdm:
    """A tqdm bar on stderr; `ABD_JAX_NO_PROGRESS=1` silences it (CI logs, tests)."""
    disable = os.environ.get("ABD_JAX_NO_PROGRESS", "") == "1"
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, disable=disable,
                mininterval=1.0)

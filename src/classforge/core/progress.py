"""Progress bars on every long step (stderr; quiet when CLASSFORGE_QUIET=1)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(iterable, total: int | None = None, desc: str = "", unit: str = "file"):
    disable = os.environ.get("CLASSFORGE_QUIET") == "1" or (total is not None and total < 50)
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable,
                dynamic_ncols=True, leave=False)

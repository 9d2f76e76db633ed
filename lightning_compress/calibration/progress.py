"""A progress bar for long calibration loops: tqdm on rank 0 at a terminal, silent elsewhere."""

from __future__ import annotations

import sys

from lightning_compress.nn.distributed import is_rank_zero


class Progress:
    """A progress bar over ``total`` steps: tqdm on rank 0 when stderr is a terminal, silent otherwise.

    Use as a context manager; :meth:`step` advances it and shows what was just processed.
    """

    def __init__(self, total: int, desc: str) -> None:
        quiet = not sys.stderr.isatty() or not is_rank_zero()
        self.bar = None
        if not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def step(self, what: str = "") -> None:
        """Advance by one, labelled ``what``."""
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

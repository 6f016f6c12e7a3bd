"""One-line usage errors for every command line of the project (hubnode, hubctl, deploy.cluster).

argparse prints its usage block before the error; on a terminal that block
buries the one line that says what is wrong, and scripts get three lines to
parse. Pure: argparse only, so the node's pure config can use it.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["OneLineParser"]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are `PROG: error: MESSAGE (see PROG --help)`, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

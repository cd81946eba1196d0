"""Training FastVL models on LLaVA-format data: ``torchrun --nproc_per_node=N -m fastvl.train ARGS`` or
``fastvl train ARGS`` (see ``fastvl.train.arguments`` for the flags)."""
import os
import sys

from .arguments import PARTS, TrainArguments, parse_args
from .trainer import BadDataError, train

__all__ = ["PARTS", "BadDataError", "TrainArguments", "main", "parse_args", "train"]


def main(argv=None):
    """The entry point of every rank. Exit status 2 on a bad argument or setting, 1 on too much bad data (the
    message on rank 0's stderr)."""
    try:
        train(parse_args(sys.argv[1:] if argv is None else argv))
    except (ValueError, BadDataError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"fastvl train: {e}", file=sys.stderr)
        return 1 if isinstance(e, BadDataError) else 2
    return 0

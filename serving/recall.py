"""`python serving/recall.py --bundle DIR --feature-repo DIR [...]`: the same as `leadre serve recall [...]`.

The predictor lives in the installed package (`leadre.predictors.RecallModel`, a `kserve.Model` named "recall"),
so images and `pip install` users run `leadre serve recall`; this file is for running from a checkout.
"""

import sys

from leadre.cli import main
from leadre.predictors import RecallModel

__all__ = ["RecallModel"]

if __name__ == "__main__":
    sys.exit(main(["serve", "recall", *sys.argv[1:]]))

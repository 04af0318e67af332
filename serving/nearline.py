"""`python serving/nearline.py --bundle DIR --feature-repo DIR [...]`: the same as `leadre serve nearline [...]`.

The predictor lives in the installed package (`leadre.predictors.NearlineModel`, a `kserve.Model` named
"nearline"), so images and `pip install` users run `leadre serve nearline`; this file is for running from a checkout.
"""

import sys

from leadre.cli import main
from leadre.predictors import NearlineModel

__all__ = ["NearlineModel"]

if __name__ == "__main__":
    sys.exit(main(["serve", "nearline", *sys.argv[1:]]))

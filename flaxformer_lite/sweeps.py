"""The former name of ``flaxformer_lite.sweep_space``, kept so that sweep files that import it still load."""

import sys

from flaxformer_lite import sweep_space

sys.modules[__name__] = sweep_space  # One module under both names: ``sweeps.grid is sweep_space.grid``.

"""Contracts a plug-in must meet, as scikit-learn's ``check_estimator`` does for estimators: run
them over every registered dictionary (and over yours) in a test.

    from gig_dist.testing import check_dictionary, check_stages
    check_dictionary("my_dictionary")          # raises AssertionError naming the broken rule
    check_stages(small_config, tmp_path)       # every registered stage: fingerprint, specs, resume
"""

from gig_dist.testing.dictionaries import check_dictionary
from gig_dist.testing.stages import check_stages

__all__ = ["check_dictionary", "check_stages"]

"""Contracts a plug-in must meet, as scikit-learn's ``check_estimator`` does for estimators: run
them over every registered dictionary (and over yours) in a test.

    from gig_dist.testing import check_dictionary
    check_dictionary("my_dictionary")          # raises AssertionError naming the broken rule
"""

from gig_dist.testing.dictionaries import check_dictionary

__all__ = ["check_dictionary"]

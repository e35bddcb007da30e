"""scikit-learn's estimator checks (public API only) on both estimators."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from kmeans_dask import KMeans, MiniBatchKMeans

# The one check scikit-learn also expects its own KMeans and MiniBatchKMeans to
# fail: the random initialisations draw differently from weighted rows than
# from repeated ones.  With given initial centres, integer weights equal
# repeated rows (test_kmeans.py and test_minibatch.py check that).
RANDOM_INIT = "sample_weight is not equivalent to removing/repeating samples (random init)."


def _expected_failures(estimator):
    return {"check_sample_weight_equivalence_on_dense_data": RANDOM_INIT}


@parametrize_with_checks([KMeans(), MiniBatchKMeans()], expected_failed_checks=_expected_failures)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)

"""kmeans-dask: distributed K-Means on Dask arrays for MNIST and Fashion-MNIST.

The public names are imported lazily: Dask workers unpickle task functions
from :mod:`kmeans_dask._kernels`, and importing the estimator there would
pull scikit-learn and SciPy into every worker (about 200 MB of memory each).
"""

from .errors import KMeansDaskError

__version__ = "0.1.0"

__all__ = ["KMeans", "KMeansDaskError", "MiniBatchKMeans", "load", "save", "__version__"]


def __getattr__(name):
    if name in ("KMeans", "load", "save"):
        from . import kmeans

        return getattr(kmeans, name)
    if name == "MiniBatchKMeans":
        from .minibatch import MiniBatchKMeans

        return MiniBatchKMeans
    raise AttributeError(f"module 'kmeans_dask' has no attribute {name!r}")

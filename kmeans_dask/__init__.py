"""kmeans-dask: distributed K-Means on Dask arrays for MNIST and Fashion-MNIST."""

from .errors import KMeansDaskError
from .kmeans import KMeans, load, save

__version__ = "0.1.0"

__all__ = ["KMeans", "KMeansDaskError", "load", "save", "__version__"]

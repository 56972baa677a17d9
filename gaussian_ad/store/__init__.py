"""The Zarr feature store and the out-of-core reductions over it on Dask."""

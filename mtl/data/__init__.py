"""Data: ``fetch`` (cache of real data sets), ``movielens``, ``census``, ``splits``, ``batching``.

Modules are imported explicitly (``from mtl.data import movielens``) so that
``python -m mtl.data.fetch`` stays light and free of import cycles.
"""

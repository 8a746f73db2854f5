"""The synapse database: one interface (:class:`SynapseStore`), SQLite and MongoDB backends.

Open a store by URL with :func:`open_store` (see :mod:`cleftwise.storage.db.base` for the URL
forms and :mod:`cleftwise.storage.db.schema` for the record schema)::

    from cleftwise.storage.db import open_store
    with open_store("sqlite:////tmp/syn.db") as db:
        db.upsert_many(block_df, block_id=7)
        df = db.query(roi=((0, 0, 0), (400, 4000, 4000)), min_score=0.5)
"""

from cleftwise.storage.db.base import ONE_BATCH, SynapseStore
from cleftwise.storage.db.connect import open_store

__all__ = ["SynapseStore", "ONE_BATCH", "open_store"]

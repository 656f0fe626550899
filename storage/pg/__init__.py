"""PostgreSQL: the pool, schema migrations, partitions and every repository.

Changes here when the schema or a query changes. All SQL of the project lives in
this package. A repository may hand a committed change over to Redis
(``storage.redis``), never the other way round.
"""

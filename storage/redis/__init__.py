"""Redis: connection, key names, Lua scripts, queue, limits, cache, publisher.

Changes here when how we use Redis changes. Imports no PostgreSQL code.
"""

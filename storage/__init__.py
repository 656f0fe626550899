"""The typed core every process shares; imports flow toward it, never out of it.

- ``storage.domain``: pure types and rules (ids, statuses, segments, phones,
  recurrence, quiet-hours windows, events, error codes and envelope bytes).
  msgspec and the standard library only: no I/O.
- ``storage.pg``: PostgreSQL, the truth: the pool, migrations, partitions, and
  every repository (all SQL of the project lives here).
- ``storage.redis``: Redis, the fast path: connection, key names, Lua scripts
  (``storage/redis/lua/*.lua``), the queue, rate limits, send limits, the
  cache and the event publisher.
- ``storage.process``: what a process is started with: settings from the
  environment, the services it opens, logs, mail.
- ``storage.responses``: the one module that knows Starlette; it turns the
  domain's envelope into responses for REST, SSE and the provider webhook.
"""

"""MMS media: files checked by content, kept in the object store, named by a row
in Postgres (docs/protocol.md "Media (MMS)")."""

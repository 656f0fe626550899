"""The message archive: months of messages, recipients and conversation messages
moved out of Postgres into files in the object store (docs/operations.md)."""

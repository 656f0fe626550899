"""What a process starts with: settings from the environment, the services it
opens (pool, Redis, publisher, relay), structured logs and mail.
"""

"""Storage: the SQLite store of clients, runs, rounds and uploads (and its row types), the
telemetry tables, each run's artifacts folder (adapters, reports, the upload spool), and the
state folder's lock."""

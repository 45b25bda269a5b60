"""How the reconciler loop talks to providers: one `Lane` per provider (its adapter, limits,
connection pool and the batches waiting in memory for a turn) and `exchange`, which drives
one batch's sans-I/O flow through a lane and says how it ended.

Nothing here knows tasks' schedules or the store: the loop (`reconciler.reconciler`) leases,
decides and writes through the service; this package only sends requests within limits.
"""

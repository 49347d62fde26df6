"""`kitsseg evaluate` (placeholder until its issue lands)."""

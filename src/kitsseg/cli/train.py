"""`kitsseg train` (placeholder until its issue lands)."""

"""`kitsseg segment` (placeholder until its issue lands)."""

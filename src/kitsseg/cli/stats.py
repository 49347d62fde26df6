"""`kitsseg stats` (placeholder until its issue lands)."""

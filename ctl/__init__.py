"""tabbyctl: the operator CLI."""

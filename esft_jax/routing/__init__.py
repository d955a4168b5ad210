"""Routing statistics, expert scores and expert selection."""

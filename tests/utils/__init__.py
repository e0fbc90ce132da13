"""Helpers shared by the tests: SQL builders for registry rows."""

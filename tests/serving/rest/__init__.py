"""REST edge tests."""

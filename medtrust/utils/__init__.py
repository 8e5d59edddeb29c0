"""Small shared helpers: logging, atomic file writes."""

"""`rae demo`: the whole chain on bundled photos, and its report."""

"""Graph passes: canonicalization, gradient support rewrites, the gradient filter."""

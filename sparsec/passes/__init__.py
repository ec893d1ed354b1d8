"""Graph passes. Each pass module holds one pass; ``manager`` runs them and ``surgery`` is the
one place where weights are edited."""

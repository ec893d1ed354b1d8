"""Read-only analyses of a Graph: dependency groups (``depgraph``) and cost (``cost``)."""

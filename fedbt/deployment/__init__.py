"""Real multi-machine deployment: one Flower SuperLink (the server) and one SuperNode per hospital."""

"""Server side: the ServerApp's round loop, evaluation, checkpoints, export and metrics."""

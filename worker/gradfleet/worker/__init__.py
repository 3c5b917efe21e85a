"""gradfleet workers: Ray actors, the trainer and local mode."""

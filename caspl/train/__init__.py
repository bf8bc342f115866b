"""Training loops (boosting, adapting), evaluation, schedules and training checkpoints."""

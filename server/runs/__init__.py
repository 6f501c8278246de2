"""The run and round engine: the run manager (one run, or a standing server's queue), each
run's round engine (sampling, deadlines, uploads, aggregation worker, evaluation), recovery
after a crash, the operator's actions, and the run specification."""

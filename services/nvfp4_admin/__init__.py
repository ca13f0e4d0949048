"""nvfp4ctl: the admin command line of nvfp4-stack (jobs, serving, workers, benchmarks)."""

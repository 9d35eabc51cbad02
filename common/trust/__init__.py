"""What a node and the coordinator check before anything of a run executes: the run's app is the
one they pinned (`app_pin`), and its config is the job the operator signed (`job_signature`)."""

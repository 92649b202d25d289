"""What a user runs or submits: the rae command line, Ray Train jobs and job configs."""

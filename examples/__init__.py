"""Examples of extending fedsqueeze with your own code (see README, "Bring your own task")."""

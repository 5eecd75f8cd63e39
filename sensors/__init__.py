"""When flows run: source-change sensors and schedules."""

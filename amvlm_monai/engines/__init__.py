"""Training engines: the stage-1 and stage-2 trainers, the EMA teacher, the optimiser step, text guidance, resumable state."""

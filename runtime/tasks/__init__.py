"""Tasks (one file each): how a run starts, what each step adds and how it ends (sdrt.runtime.tasks.base)."""

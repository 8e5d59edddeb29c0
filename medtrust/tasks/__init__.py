"""Tasks: LightningModules that take their networks, loss and optimizer as arguments."""

"""Networks: plain nn.Modules (or factories returning library modules)."""

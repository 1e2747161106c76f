"""First-order optimizers (`OPTIMIZERS`) and the preconditioner built on top of them."""

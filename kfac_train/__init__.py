"""kfac-train: large-batch training with a bundled distributed K-FAC preconditioner.

Entry points: `kfac_train.app.train(cfg)` (the application) and `kfac_train.kfac` (the
optimizer library, usable on its own).
"""

__version__ = "0.1.0"

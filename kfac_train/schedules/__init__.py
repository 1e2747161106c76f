"""Per-iteration learning-rate schedules (`SCHEDULES`) and the K-FAC hyperparameter schedules."""

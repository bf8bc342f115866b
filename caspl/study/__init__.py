"""Studies: Ray Tune + Optuna search over CasPL hyperparameters, MLflow tracking, resume, summaries."""

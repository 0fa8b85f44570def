"""Using a trained model: the Segmenter, its rendering, the MLflow model and the batch job's
actor."""
